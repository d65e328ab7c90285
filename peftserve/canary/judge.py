"""Statistical judge: has the candidate been shown worse than stable, or shown good enough?

Pure functions over :class:`~peftserve.canary.metrics.Evidence`; no engine, no clock, no storage.

* :func:`judge` reads the evidence of the whole rollout so far and, per metric of the
  :class:`~peftserve.canary.spec.AnalysisSpec`, bounds the candidate's *harm* (candidate minus
  stable in the harmful direction, relative where the metric is) from below and from above with
  bounds that hold at every look at once (see :mod:`peftserve.canary.sequential`):

  - **fail** when the lower bound exceeds the tolerance: the harm is shown to exceed what is
    accepted. Each metric gets an even share of ``alpha`` (half of it when segments are judged;
    the other half is split over the segment tests), so the chance that a candidate within
    tolerance is ever rolled back, over all metrics, segments and looks, is at most ``alpha``;
  - **pass** when the upper bound (at level ``beta``) is below the mde: a harm as large as the
    mde is ruled out. A candidate whose harm reaches the mde passes with chance at most ``beta``;
  - **pending** in between; **nodata** with fewer than ``min_samples`` units per arm for an
    approximate test; **exhausted** when a greedy eval set has been answered in full by both
    versions without a decision (it can say no more; the start plan warned about it).

* :func:`decide` turns the latest judgment into one action for the controller: roll back on a
  critical failure, advance a step when the evidence suffices for it, promote from the last step
  when every required metric has passed, hold otherwise, pause when a person should look.

Tests by metric (docs/judge.md has the method and its references):

=================== =====================================================================
metric              test
=================== =====================================================================
event rates         fail: exact conditional-binomial e-process on the rate ratio, stratified
(error_rate,        by allocation step (tolerance 0 or relative); pass: asymptotic
non_finite,         confidence sequence of the difference, clustered by unit
finish_<reason>)
latency             probes' engine time per step, candidate against a twin of stable (a second
                    slot with stable's weights, so both are minority adapters), paired by prompt
latency_e2e, ttft,  stratified difference of means (relative: of log means), clustered by
tpot, output_tokens, unit, asymptotic confidence sequence
feedback_score
probe_accuracy      paired by prompt; greedy with tolerance 0: exact sequential McNemar
                    (e-process on discordant pairs); pass: paired asymptotic sequence
shadow_divergence   candidate LLRs against the stable noise floor
=================== =====================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

from peftserve.canary import sequential as seq
from peftserve.canary.metrics import COL, EMPTY_TABLE, EVENT_METRICS, MEAN_METRICS, Evidence
from peftserve.canary.spec import Action, AnalysisSpec, DecisionPolicy, MetricSpec, Rollout

Status = Literal["pass", "fail", "pending", "nodata", "exhausted", "suspect"]
Result = Literal["pass", "fail", "pending", "nodata", "error"]
DONE: frozenset[str] = frozenset({"pass", "exhausted"})
"""Statuses with which a required metric lets the rollout promote."""

SEGMENT_METRICS = frozenset(MEAN_METRICS)
"""Metrics also judged per segment (fail only: a segment can roll back, never hold a promotion)."""
SHOWN_SEGMENTS = 3
"""Segment results kept in a judgment per metric: the failed ones and the worst few."""
SEGMENT_EFFECT = 3.0
"""Segment tests tune their mixture to three times the metric's mde: a regression confined to a
segment must be larger to matter, and is then caught with fewer samples."""
SUSPECT_Z = 3.0
"""A segment whose estimate is past the midpoint of tolerance and mde by this many standard
errors is *suspect*: it holds the promotion (not the steps) until it fails or fades."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class MetricResult:
    """Evidence on one metric (or one segment of it): the test, the margin and the numbers."""

    name: str
    status: Status
    test: str
    """The test that decided, in words (and its level)."""
    critical: bool = True
    required: bool = True
    segment: str = ""
    """Segment label ("" for all traffic)."""
    direction: str = "increase"
    relative: bool = False
    n_stable: int = 0
    """Units (users, sessions, prompts, time blocks) of the stable arm in the comparison."""
    n_candidate: int = 0
    samples_stable: float = 0.0
    """Samples (requests, answers, scores) of the stable arm."""
    samples_candidate: float = 0.0
    stable_value: float | None = None
    candidate_value: float | None = None
    harm: float | None = None
    """Estimated harm (candidate minus stable in the harmful direction; relative where the metric is)."""
    lower: float | None = None
    """Lower bound of the harm, valid at every look (level ``alpha``)."""
    upper: float | None = None
    """Upper bound of the harm, valid at every look (level ``beta``)."""
    tolerance: float = 0.0
    mde: float = 0.0
    alpha: float = 0.0
    beta: float = 0.0
    evalue: float | None = None
    """E-value of an exact test (fail at ``1 / alpha``; ``2 / alpha`` for the greedy McNemar test, which
    keeps half its alpha for the look at a fully answered eval set)."""
    needed: float | None = None
    """Candidate samples the pass is expected to need at the current variance (None: unknown)."""
    detail: str = ""
    """One line a person can read: numbers, test, margin and status."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def progress(self) -> float | None:
        """Share of the samples a pass needs that are in (None: unknown)."""
        if self.status in DONE or self.status == "fail":
            return 1.0
        if self.needed is None or not self.needed > 0:
            return None
        return min(1.0, self.samples_candidate / self.needed)


@dataclass(frozen=True)
class Judgment:
    """One look at the rollout's evidence: the verdict and what it rests on."""

    result: Result
    """fail, pass (every required metric passed), pending, nodata or error."""
    reason: str
    """Why, naming the deciding metric, its test, margin and evidence."""
    metrics: tuple[MetricResult, ...] = ()
    at: float = 0.0
    samples: float = 0.0
    """Samples seen by the judged metrics so far (for the no-data timer)."""

    @property
    def failed(self) -> tuple[MetricResult, ...]:
        return tuple(m for m in self.metrics if m.status == "fail")

    @property
    def failed_critical(self) -> tuple[str, ...]:
        """Names (with segment) of the critical metrics that failed."""
        return tuple(_label(m) for m in self.failed if m.critical)

    @property
    def progress(self) -> float | None:
        """Least progress over the required metrics not yet passed (1 when all passed)."""
        values = [m.progress for m in self.metrics if m.required and not m.segment]
        known = [v for v in values if v is not None]
        return min(known) if known else None

    @classmethod
    def error(cls, message: str, at: float = 0.0) -> Judgment:
        """The record of an evaluator error (exception in the judge, failed probes); never a failure."""
        return cls("error", f"error: {message}", (), at)

    def to_dict(self) -> dict[str, Any]:
        return {"result": self.result, "reason": self.reason, "metrics": [m.to_dict() for m in self.metrics],
                "at": self.at, "samples": self.samples, "progress": self.progress}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Judgment:
        if data.get("result") not in ("pass", "fail", "pending", "nodata", "error"):
            raise ValueError(f"judgment result must be pass, fail, pending, nodata or error, not {data.get('result')!r}")
        return cls(data["result"], data["reason"], tuple(MetricResult.from_dict(m) for m in data.get("metrics", ())),
                   data.get("at", 0.0), data.get("samples", 0.0))


def alarming(m: MetricResult) -> bool:
    """Undecided, with the estimate past the midpoint of tolerance and mde: worth holding for."""
    return (m.status not in DONE and m.status != "fail" and m.harm is not None
            and m.harm > (m.tolerance + m.mde) / 2)


def _label(m: MetricResult) -> str:
    return f"{m.name}[{m.segment}]" if m.segment else m.name


def _fmt(v: float | None, relative: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "n/a" if v is None else ("+inf" if v > 0 else "-inf")
    return f"{v:+.1%}" if relative else f"{v:+.4g}"


# --------------------------------------------------------------------------- one metric


@dataclass(frozen=True)
class _Plan:
    """A metric's levels and mixing precisions, fixed by the spec."""

    alpha: float
    beta: float
    rho_fail: float
    rho_pass: float
    tol: float
    """Tolerance on the scale of the estimate (log for relative means)."""
    mde: float


def _plan(metric: MetricSpec, alpha: float, beta: float, log_scale: bool, scale: float = 1.0) -> _Plan:
    """Levels and mixing precisions of a metric's tests; the mixture is tuned to tell the
    tolerance from ``scale`` times the mde's distance to it."""
    tol, mde = metric.tolerance, metric.detectable
    if log_scale:
        tol, mde = math.log1p(tol), math.log1p(mde)
    effect = (mde - tol if mde > tol else max(mde, 1e-6)) * scale
    return _Plan(alpha, beta, seq.mixing_precision(alpha, beta, effect), seq.mixing_precision(beta, alpha, effect),
                 tol, mde)


def _harm(metric: MetricSpec, est: seq.Estimate, plan: _Plan, log_scale: bool,
          estimate: float | None = None) -> tuple[float, float, float]:
    """(harm, lower at alpha, upper at beta) in the metric's reported units.

    The harm is the difference in the harmful direction (``-d`` for a harmful decrease); the
    lower bound, which decides a failure, is taken at the metric's ``alpha``, the upper bound,
    which decides a pass, at ``beta``. On the log scale, the bounds are mapped back to relative
    changes (``exp(x) - 1``).
    """
    d = est.estimate if estimate is None else estimate
    harm = d if metric.direction == "increase" else -d
    lower = harm - seq.mixture_halfwidth(est.variance, plan.rho_fail, plan.alpha)
    upper = harm + seq.mixture_halfwidth(est.variance, plan.rho_pass, plan.beta)
    if log_scale:
        return math.expm1(harm), math.expm1(lower), math.expm1(min(upper, 700.0))
    if metric.kind == "proportion":  # a difference of shares lies in [-1, 1]
        return harm, max(lower, -1.0), min(upper, 1.0)
    return harm, lower, upper


def _needed(est: seq.Estimate, harm: float, plan: _Plan, samples: float) -> float | None:
    """Candidate samples at which the upper bound is expected below the mde (harm as now)."""
    room = plan.mde - max(harm, 0.0)
    if room <= 0 or not est.variance > 0 or not math.isfinite(est.variance) or samples <= 0:
        return None
    info = seq.information_for(room, plan.rho_pass, plan.beta)
    return samples * info * est.variance if math.isfinite(info) else None


def _classify(lower: float, upper: float, metric: MetricSpec) -> Status:
    if lower > metric.tolerance:
        return "fail"
    if upper < metric.detectable:
        return "pass"
    return "pending"


class _Judge:
    """Judges the metrics of one analysis on one evidence snapshot."""

    def __init__(self, analysis: AnalysisSpec, evidence: Evidence, eval_set_size: int | None,
                 probe_sampled: bool) -> None:
        self.analysis = analysis
        self.ev = evidence
        self.eval_set_size = eval_set_size
        self.probe_sampled = probe_sampled
        n = len(analysis.metrics)
        # The split of alpha depends on the spec alone, never on the data seen so far.
        seg_metrics = [m for m in analysis.metrics if m.name in SEGMENT_METRICS and m.baseline == "stable"]
        self.segments_on = analysis.max_segments > 0 and bool(seg_metrics)
        share = analysis.alpha / 2 if self.segments_on else analysis.alpha
        self.alpha_metric = share / n
        self.alpha_segment = (analysis.alpha / 2) / max(len(seg_metrics) * analysis.max_segments, 1)
        self._cache: dict[str, seq.GroupedEstimates] = {}

    # ---- dispatch -------------------------------------------------------------------

    def metric(self, m: MetricSpec) -> MetricResult:
        if m.name == "probe_accuracy":
            return self._probes(m)
        if m.name == "latency":
            return self._latency(m)
        if m.name == "shadow_divergence":
            return self._shadow(m)
        if m.baseline == "none":
            return self._own(m)
        return self._mean(m, segment=0, alpha=self.alpha_metric)

    def segments(self, m: MetricSpec) -> list[MetricResult]:
        """The segments of ``m`` that failed, and the few that look worst (fail only: a segment
        can roll back, never hold a promotion)."""
        if not self.segments_on or m.name not in SEGMENT_METRICS or m.baseline != "stable":
            return []
        ge = self._grouped(m)
        ok = np.minimum(ge.candidate_units, ge.stable_units) >= self.analysis.min_samples
        ok[0] = False  # segment 0 is all traffic
        ok &= ge.estimate == ge.estimate
        codes = np.flatnonzero(ok)
        codes = codes[np.argsort(-ge.candidate_units[codes], kind="stable")][: self.analysis.max_segments]
        if codes.size == 0:
            return []
        # Screen every segment at once; full results only for the failed and the worst few.
        plan = _plan(m, self.alpha_segment, self.analysis.beta, m.relative, SEGMENT_EFFECT)
        est, var = ge.estimate[codes], ge.variance[codes]
        harm = est if m.direction == "increase" else -est
        harm_low = harm - seq.mixture_halfwidths(var, plan.rho_fail, plan.alpha)
        tol = plan.tol
        failing = harm_low > tol
        if m.name in EVENT_METRICS and (m.relative or m.tolerance == 0):
            tc, nc, ts, ns = (x[codes] for x in ge.counts)
            if m.direction == "decrease":
                tc, ts = nc - tc, ns - ts
            e = seq.rate_ratio_evalues(tc, ts, nc, ns, 1.0 + m.tolerance if m.relative else 1.0)
            failing = e >= 1.0 / self.alpha_segment
        midpoint = (plan.tol + plan.mde) / 2
        suspect = (harm > midpoint) & ((harm - midpoint) >= SUSPECT_Z * np.sqrt(np.maximum(var, 0.0)))
        order = np.argsort(-harm, kind="stable")
        shown = [i for i in order.tolist() if harm[i] > tol][:SHOWN_SEGMENTS]
        picks = sorted(set(np.flatnonzero(failing | suspect).tolist()) | set(shown))
        labels = {code: label for label, code in self.ev.segments.items()}
        out = []
        for i in picks:
            code = int(codes[i])
            r = self._mean(m, segment=code, alpha=self.alpha_segment, label=labels[code], effect=SEGMENT_EFFECT)
            if r.status != "fail":
                r = _replace(r, status="suspect" if suspect[i] else "pending")
            out.append(r)
        return out

    # ---- mean-type metrics ----------------------------------------------------------

    def _grouped(self, m: MetricSpec) -> seq.GroupedEstimates:
        """Every segment's comparison of a ratio metric at once (cached per metric)."""
        cached = self._cache.get(m.name)
        if cached is not None:
            return cached
        num, den = MEAN_METRICS[m.name]
        arms = []
        for version in (self.ev.candidate, self.ev.stable):
            stratum, segment, unit, cols = self.ev.tables.get(version, EMPTY_TABLE)
            count = cols[COL[den]]
            keep = count > 0
            arms.append(seq.Grouped(segment[keep], stratum[keep], unit[keep], cols[COL[num]][keep], count[keep]))
        binary = m.name in EVENT_METRICS or (
            m.name == "feedback_score" and self.ev.total(self.ev.candidate, "feedback_graded") == 0
            and self.ev.total(self.ev.stable, "feedback_graded") == 0)
        ge = seq.grouped_difference(arms[0], arms[1], max(len(self.ev.segments), 1), log_scale=m.relative,
                                    binary=binary)
        self._cache[m.name] = ge
        return ge

    def _mean(self, m: MetricSpec, *, segment: int, alpha: float, label: str = "", effect: float = 1.0) -> MetricResult:
        ge = self._grouped(m)
        g = segment
        n_c, n_s = float(ge.candidate_samples[g]), float(ge.stable_samples[g])
        u_c, u_s = int(ge.candidate_units[g]), int(ge.stable_units[g])
        event = m.name in EVENT_METRICS
        log_scale = m.relative
        plan = _plan(m, alpha, self.analysis.beta, log_scale, effect)
        base = self._base(m, label, u_s, u_c, n_s, n_c, alpha)
        exact = event and (m.relative or m.tolerance == 0)
        if n_c == 0 or n_s == 0:
            return MetricResult(status="nodata", test="no samples in an arm", **base,
                                detail=f"{_name(m, label)}: {n_s:g} stable / {n_c:g} candidate samples -> nodata")
        est = ge.get(g)
        if est is None:
            return MetricResult(status="nodata", test="no step with samples in both arms", **base,
                                detail=f"{_name(m, label)}: no allocation step has samples in both arms -> nodata")
        harm, lower, upper = _harm(m, est, plan, log_scale)
        evalue = None
        enough = min(u_c, u_s) >= self.analysis.min_samples
        if exact:
            ratio = 1.0 + m.tolerance if m.relative else 1.0
            tc, nc, ts, ns = (x[g] for x in ge.counts)
            if m.direction == "decrease":  # fewer events is the harm: count the non-events
                tc, ts = nc - tc, ns - ts
            evalue = seq.rate_ratio_evalue(tc, ts, nc, ns, ratio)
            status: Status = "fail" if evalue >= 1.0 / alpha else "pending"
            if status != "fail" and enough and upper < m.detectable:
                status = "pass"
            test = (f"exact conditional-binomial e-process (rate ratio <= {ratio:g}; e-value {evalue:.3g}, "
                    f"fail at {1 / alpha:.4g}); pass: confidence sequence (user-clustered)")
        else:
            status = _classify(lower, upper, m) if enough else "nodata"
            scale = "log-mean" if log_scale else "mean"
            test = (f"confidence sequence of the {scale} difference (normal mixture, user-clustered, "
                    f"stratified by step; alpha {alpha:.2g}, beta {self.analysis.beta:.2g})")
        needed = None if label else _needed(est, est.estimate if m.direction == "increase" else -est.estimate,
                                            plan, n_c)
        values = (est.stable_value, est.candidate_value)
        what = f"{values[0]:.4g} -> {values[1]:.4g} ({n_s:g} / {n_c:g} samples, {u_s} / {u_c} units)"
        return self._result(m, label, base, status, test, what, harm, lower, upper, values, evalue, needed)

    def _own(self, m: MetricSpec) -> MetricResult:
        """baseline "none": the candidate's own value against the tolerance."""
        num, den = MEAN_METRICS.get(m.name, ("", ""))
        alpha = self.alpha_metric
        if not num:
            raise ValueError(f"{m.name}: baseline 'none' is for request and feedback metrics")
        cand = self.ev.arm(self.ev.candidate, num, den)
        base = self._base(m, "", 0, cand.units, 0.0, cand.samples, alpha)
        if cand.samples == 0:
            return MetricResult(status="nodata", test="no candidate samples", **base,
                                detail=f"{m.name}: no candidate samples -> nodata")
        events = float(cand.total.sum())
        value = events / cand.samples
        if m.kind == "proportion" and m.tolerance == 0 and m.direction == "increase":
            harm = lower = upper = value
            status: Status = "fail" if events > 0 else (
                "pass" if cand.units >= self.analysis.min_samples and value < m.detectable else "pending")
            test = "zero tolerance: any event fails"
        else:
            # The candidate's mean against a zero "arm": the same clustered machinery, one arm.
            zero = seq.Arm(cand.stratum, cand.unit, np.zeros_like(cand.total), cand.count)
            est = seq.stratified_difference(cand, zero, binary=m.kind == "proportion")
            assert est is not None  # both arms have the candidate's strata
            est = seq.Estimate(value, est.variance, 0.0, value, est.strata)
            harm, lower, upper = _harm(m, est, _plan(m, alpha, self.analysis.beta, False), False)
            status = _classify(lower, upper, m) if cand.units >= self.analysis.min_samples else "nodata"
            test = f"confidence sequence of the candidate's own mean (no baseline; alpha {alpha:.2g})"
        what = f"candidate {value:.4g} ({cand.samples:g} samples)"
        return self._result(m, "", base, status, test, what, harm, lower, upper, (None, value), None, None)

    # ---- latency: probes against a twin of stable --------------------------------

    def _latency(self, m: MetricSpec) -> MetricResult:
        """Engine time per step of the probes, candidate against stable's twin, paired by prompt.

        A minority adapter shares its steps with the majority's, so its requests' latency
        measures batch composition as much as the adapter. The probes of stable run in a twin
        slot (a second copy of stable's weights), so both probes are minorities in the same
        traffic; their engine time per step (queueing excluded) includes whatever each adapter
        costs every request of its steps. Harm: the ratio of geometric means minus one.
        """
        alpha = self.alpha_metric
        prompts, stable, cand = self.ev.paired_probes(latency=True)
        n = int(prompts.size)
        base = self._base(m, "", n, n, self.ev.probe_answers(self.ev.stable, latency=True),
                          self.ev.probe_answers(self.ev.candidate, latency=True), alpha)
        if n == 0:
            return MetricResult(status="nodata", test="no timed probes on both versions", **base,
                                detail=f"{m.name}: no probe with the engine's step times on both versions yet "
                                       "-> nodata")
        est = seq.paired_difference(cand, stable, binary=False)
        assert est is not None
        log_scale = True
        plan = _plan(m, alpha, self.analysis.beta, log_scale)
        harm, lower, upper = _harm(m, est, plan, log_scale)
        status = _classify(lower, upper, m) if n >= self.analysis.min_samples else "nodata"
        test = (f"paired confidence sequence of the log engine time per step, candidate against a twin of stable "
                f"(both minority adapters; {n} prompts; alpha {alpha:.2g})")
        what = (f"engine time per step {math.exp(est.stable_value) * 1e3:.3g} ms -> "
                f"{math.exp(est.candidate_value) * 1e3:.3g} ms")
        needed = _needed(est, est.estimate, plan, float(n))
        return self._result(m, "", base, status, test, what, harm, lower, upper,
                            (math.exp(est.stable_value), math.exp(est.candidate_value)), None, needed)

    # ---- probes ---------------------------------------------------------------------

    def _probes(self, m: MetricSpec) -> MetricResult:
        alpha = self.alpha_metric
        prompts, stable, cand = self.ev.paired_probes()
        n = int(prompts.size)
        base = self._base(m, "", n, n, self.ev.probe_answers(self.ev.stable), self.ev.probe_answers(self.ev.candidate),
                          alpha)
        if n == 0:
            return MetricResult(status="nodata", test="no prompt answered by both versions", **base,
                                detail=f"{m.name}: no eval-set prompt answered by both versions yet -> nodata")
        est = seq.paired_difference(cand, stable)
        assert est is not None  # n > 0
        plan = _plan(m, alpha, self.analysis.beta, m.relative)
        harm, lower, upper = _harm(m, est, plan, False)
        enough = n >= self.analysis.min_samples
        greedy = not self.probe_sampled
        full = greedy and self.eval_set_size is not None and n >= self.eval_set_size
        evalue = None
        if greedy and m.tolerance == 0 and m.direction == "decrease":
            # alpha in two halves: the e-process at every look, and one fixed-sample exact test
            # when the finite set is answered in full (its data no longer change: a single look).
            # Their union errs with chance at most alpha; the last test has the power a finite set
            # gives, which the always-valid test alone spends on looking.
            lost = float(np.sum((stable > cand) * (stable - cand)))
            won = float(np.sum((cand > stable) * (cand - stable)))
            evalue = seq.rate_ratio_evalue([lost], [won], [1.0], [1.0], 1.0)
            status: Status = "fail" if evalue >= 2 / alpha else "pending"
            test = (f"exact sequential McNemar (e-process on {lost:g} lost / {won:g} won discordant prompts; "
                    f"e-value {evalue:.3g}, fail at {2 / alpha:.4g})")
            if full:
                n_lost, n_won = int(np.sum(stable > cand)), int(np.sum(cand > stable))
                p_value = seq.binomial_tail(n_lost, n_lost + n_won)
                if p_value <= alpha / 2:
                    status = "fail"
                test += f"; answered in full: exact McNemar p {p_value:.3g}, fail at {alpha / 2:.2g}"
            else:
                test += f"; once answered in full, exact McNemar at {alpha / 2:.2g}"
            if status != "fail" and enough and upper < m.detectable:
                status = "pass"
            test += "; pass: paired confidence sequence"
        else:
            status = _classify(lower, upper, m) if enough else "nodata"
            kind = "greedy" if greedy else "sampled, per-prompt means"
            test = f"paired confidence sequence over prompts ({kind}; alpha {alpha:.2g})"
        if full and status in ("pending", "nodata"):
            status = "exhausted"
            test += f"; the {self.eval_set_size}-prompt eval set is answered in full and cannot show more"
        needed = _needed(est, -est.estimate if m.direction == "decrease" else est.estimate, plan, float(n))
        if full:
            needed = None
        what = (f"accuracy {est.stable_value:.3g} -> {est.candidate_value:.3g} over {n} paired prompts")
        return self._result(m, "", base, status, test, what, harm, lower, upper,
                            (est.stable_value, est.candidate_value), evalue, needed)

    # ---- shadow divergence ----------------------------------------------------------

    def _shadow(self, m: MetricSpec) -> MetricResult:
        alpha = self.alpha_metric
        cand, noise = self.ev.shadow_llr, self.ev.noise_llr
        base = self._base(m, "", noise.size, cand.size, float(noise.size), float(cand.size), alpha)
        if cand.size == 0 or noise.size == 0:
            return MetricResult(status="nodata", test="no shadow copies or noise floor", **base,
                                detail=f"{m.name}: {noise.size} noise / {cand.size} shadow LLRs -> nodata")
        units_c = np.arange(cand.size, dtype=np.int64)
        units_s = np.arange(noise.size, dtype=np.int64) + cand.size
        est = seq.stratified_difference(
            seq.Arm(np.zeros(cand.size, np.int64), units_c, cand, np.ones(cand.size)),
            seq.Arm(np.zeros(noise.size, np.int64), units_s, noise, np.ones(noise.size)),
        )
        assert est is not None
        plan = _plan(m, alpha, self.analysis.beta, False)
        harm, lower, upper = _harm(m, est, plan, False)
        enough = min(cand.size, noise.size) >= self.analysis.min_samples
        status = _classify(lower, upper, m) if enough else "nodata"
        test = f"confidence sequence of the mean LLR against the noise floor (alpha {alpha:.2g})"
        what = f"LLR {est.stable_value:.4g} (noise) -> {est.candidate_value:.4g} (candidate)"
        return self._result(m, "", base, status, test, what, harm, lower, upper,
                            (est.stable_value, est.candidate_value), None, None)

    # ---- helpers --------------------------------------------------------------------

    def _base(self, m: MetricSpec, label: str, n_s: int, n_c: int, s_s: float, s_c: float,
              alpha: float) -> dict[str, Any]:
        return {"name": m.name, "critical": m.critical, "required": m.required and not label, "segment": label,
                "direction": m.direction, "relative": m.relative, "n_stable": int(n_s), "n_candidate": int(n_c),
                "samples_stable": float(s_s), "samples_candidate": float(s_c), "tolerance": m.tolerance,
                "mde": m.detectable, "alpha": alpha, "beta": self.analysis.beta}

    @staticmethod
    def _result(m: MetricSpec, label: str, base: dict[str, Any], status: Status, test: str, what: str,
                harm: float, lower: float, upper: float, values: tuple[float | None, float | None],
                evalue: float | None, needed: float | None) -> MetricResult:
        rel = m.relative
        margin = (f"tolerance {_fmt(m.tolerance, rel)}, mde {_fmt(m.detectable, rel)} "
                  f"(harmful {m.direction})")
        bounds = f"harm {_fmt(harm, rel)} [{_fmt(lower, rel)}, {_fmt(upper, rel)}]"
        rule = {"fail": "lower bound beyond the tolerance", "pass": "upper bound below the mde",
                "pending": "bounds straddle the margin", "nodata": "too few units",
                "exhausted": "eval set exhausted", "suspect": "estimate well past the midpoint of the margin",
                }[status]
        detail = f"{_name(m, label)}: {what}; {bounds}; {margin}; {test}; {rule} -> {status}"
        return MetricResult(status=status, test=test, stable_value=values[0], candidate_value=values[1],
                            harm=harm, lower=lower, upper=upper, evalue=evalue, needed=needed, detail=detail, **base)


def _name(m: MetricSpec, label: str) -> str:
    return f"{m.name}[{label}]" if label else m.name


def _replace(r: MetricResult, **changes: Any) -> MetricResult:
    d = r.to_dict()
    d.update(changes)
    return MetricResult(**d)


# --------------------------------------------------------------------------- judge


def judge(analysis: AnalysisSpec, evidence: Evidence, at: float = 0.0, *, eval_set_size: int | None = None,
          probe_sampled: bool = False, elapsed_s: float | None = None, budget_s: float | None = None) -> Judgment:
    """Judge candidate against stable on every metric of ``analysis`` (and its segments).

    ``eval_set_size``: prompts in the rollout's eval set (a greedy set answered in full is
    *exhausted*); ``probe_sampled``: probes are sampled (temperature > 0), so answers repeat.
    ``elapsed_s`` (time the evidence has been gathering) and ``budget_s`` (time left before the
    rollout's ``max_duration_s``) let an optional metric hold the promotion only while its pass is
    within reach at the current rate of its samples.
    Invalid evidence raises ``ValueError``: the controller records that as an evaluator error
    (:meth:`Judgment.error`), never as a failure.
    """
    j = _Judge(analysis, evidence, eval_set_size, probe_sampled)
    results: list[MetricResult] = []
    for m in analysis.metrics:
        overall = j.metric(m)
        results.append(overall)
        segs = j.segments(m)
        failed = [r for r in segs if r.status == "fail"]
        rest = sorted((r for r in segs if r.status != "fail"), key=lambda r: -(r.harm or 0.0))
        results.extend(failed + [r for r in rest[:SHOWN_SEGMENTS] if (r.harm or 0.0) > r.tolerance])
    samples = sum(r.samples_stable + r.samples_candidate for r in results if not r.segment)
    return _verdict(results, at, samples, elapsed_s, budget_s)


def within_reach(r: MetricResult, elapsed_s: float | None, budget_s: float | None) -> bool:
    """Whether an undecided metric can expect to pass within ``budget_s`` at its samples' rate."""
    if budget_s is None or elapsed_s is None or not elapsed_s > 0 or r.needed is None:
        return True
    rate = r.samples_candidate / elapsed_s
    return rate > 0 and (r.needed - r.samples_candidate) / rate <= budget_s


def _verdict(results: Sequence[MetricResult], at: float, samples: float, elapsed_s: float | None = None,
             budget_s: float | None = None) -> Judgment:
    overall = [r for r in results if not r.segment]
    failed = [r for r in results if r.status == "fail"]
    if failed:
        worst = max(failed, key=lambda r: (r.critical, (r.lower or 0.0) - r.tolerance))
        names = ", ".join(_label(r) for r in failed)
        kind = "critical metric(s)" if any(r.critical for r in failed) else "metric(s)"
        return Judgment("fail", f"fail: {kind} {names} failed; {worst.detail}", tuple(results), at, samples)
    required = [r for r in overall if r.required]
    worrying = [r for r in overall if not r.required and r.status not in DONE and r.status != "nodata"
                and (alarming(r) or within_reach(r, elapsed_s, budget_s))]
    worrying += [r for r in results if r.segment and r.status == "suspect"]
    if required and all(r.status in DONE for r in required) and not worrying:
        closest = max(required, key=lambda r: (r.upper if r.upper is not None else -math.inf) - r.mde)
        return Judgment("pass", f"pass: all {len(required)} required metrics passed; closest: {closest.detail}",
                        tuple(results), at, samples)
    if required and all(r.status == "nodata" and r.samples_candidate == 0 for r in required):
        r = required[0]
        return Judgment("nodata", f"nodata: no required metric has data; {r.detail}", tuple(results), at, samples)
    waiting = [r for r in required if r.status not in DONE] + worrying
    slowest = min(waiting, key=lambda r: r.progress if r.progress is not None else -1.0)
    return Judgment("pending", f"pending: {len(waiting)} metric(s) undecided; slowest: {slowest.detail}",
                    tuple(results), at, samples)


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class Decision:
    """What the controller should do now, and why."""

    action: Action
    """advance, hold, pause, promote or rollback."""
    reason: str


def ladder(rollout: Rollout) -> float:
    """How far above the mde a step may still rule the harm out to advance: 2 ** steps left.

    At the first of k steps the upper bounds need only be below ``2 ** (k - 1)`` times the mde
    (a gross regression is ruled out); each step halves it, and the last step needs a pass.
    The shadow phase is step -1.
    """
    left = len(rollout.spec.steps) - 1 - rollout.step_index
    return float(2 ** max(left, 0))


def step_ready(rollout: Rollout, judgment: Judgment) -> tuple[bool, str]:
    """Whether the evidence suffices to leave the current (not last) step, and why not."""
    factor = ladder(rollout)
    for r in judgment.metrics:
        if r.segment:
            continue
        if r.status in DONE:
            continue
        if not r.required:
            if r.status != "nodata" and alarming(r):
                return False, (f"{r.name} looks worse than halfway to its mde ({_fmt(r.harm, r.relative)}); "
                               "holding")
            continue
        if r.status == "nodata" or r.upper is None:
            return False, f"{r.name} has too little data ({r.samples_candidate:g} candidate samples)"
        if alarming(r):
            return False, f"{r.name} looks worse than halfway to its mde ({_fmt(r.harm, r.relative)}); holding"
        if r.upper >= factor * r.mde:
            return False, (f"{r.name}: upper bound {_fmt(r.upper, r.relative)} not yet below "
                           f"{factor:g} x mde = {_fmt(factor * r.mde, r.relative)}")
    return True, f"every required metric is within {factor:g} x its mde"


def decide(rollout: Rollout, history: Sequence[Judgment], now: float,
           policy: DecisionPolicy | None = None) -> Decision:
    """The controller's next action for ``rollout`` given its judgments so far (oldest first).

    Rules, in order (``policy`` defaults to the rollout's own):

    1. paused or terminal rollouts are left alone (a person resumes a paused one);
    2. ``max_errors_in_row`` evaluator errors in a row pause (an error is never a failure);
    3. a failed critical metric (or segment) rolls back at once; a failed non-critical one pauses;
    4. no new sample for ``nodata_pause_s`` pauses; so does a rollout undecided after
       ``max_duration_s``;
    5. before ``step_interval_s`` has elapsed in the step, hold;
    6. at the last step, a pass promotes; before it, the step advances as soon as every required
       metric's upper bound is within :func:`ladder` times its mde (and no metric's estimate is
       past the midpoint of its tolerance and mde: :func:`alarming`);
    7. anything else holds, saying what the rollout waits for.
    """
    policy = policy or rollout.spec.policy
    if rollout.state not in ("shadow", "ramping"):
        return Decision("hold", f"rollout is {rollout.state}; nothing to decide")
    if not history:
        return Decision("hold", "no judgment yet")
    latest = history[-1]
    in_step = [j for j in history if j.at >= rollout.step_started_at] or [latest]
    if latest.result == "error":
        errors = 0
        for j in reversed(in_step):
            if j.result != "error":
                break
            errors += 1
        if errors >= policy.max_errors_in_row:
            return Decision("pause", f"{errors} evaluator errors in a row: {latest.reason}")
        return Decision("hold", f"evaluator error {errors} of {policy.max_errors_in_row} before pausing: "
                        f"{latest.reason}")
    if latest.result == "fail":
        if latest.failed_critical:
            return Decision("rollback", f"critical metric failed: {latest.reason}")
        return Decision("pause", f"a non-critical metric failed, a person decides: {latest.reason}")
    judged = [j for j in history if j.result != "error"]
    since = rollout.step_started_at  # the samples last grew at the judgment after the last smaller count
    newer = None
    for j in reversed(judged):
        if j.samples < latest.samples:
            since = max(since, newer.at if newer is not None else j.at)
            break
        newer = j
    waited = now - since
    if waited >= policy.nodata_pause_s:
        return Decision("pause", f"no new sample for {waited:.0f} s (limit {policy.nodata_pause_s:g} s): "
                        f"{latest.reason}")
    if policy.max_duration_s > 0 and now - rollout.started_at >= policy.max_duration_s:
        return Decision("pause", f"undecided after {now - rollout.started_at:.0f} s (limit "
                        f"{policy.max_duration_s:g} s): {latest.reason}")
    elapsed = now - rollout.step_started_at
    if elapsed < rollout.spec.step_interval_s:
        return Decision("hold", f"{latest.result}, {elapsed:.0f} s of the step's least "
                        f"{rollout.spec.step_interval_s:g} s: {latest.reason}")
    if rollout.state == "ramping" and rollout.is_last_step:
        if latest.result == "pass":
            return Decision("promote", f"last step ({rollout.weight:g} %) passed: {latest.reason}")
        return Decision("hold", f"waiting for every required metric to pass: {latest.reason}")
    ready, why = step_ready(rollout, latest)
    if ready:
        nxt = rollout.spec.steps[rollout.step_index + 1]
        return Decision("advance", f"{why}; advancing to {nxt:g} %: {latest.reason}")
    return Decision("hold", f"{why}: {latest.reason}")
