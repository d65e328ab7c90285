"""Statistical judge: is the candidate worse than stable, beyond tolerance? And what next?

Pure functions over samples; no engine, no clock, no storage. Two parts:

* :func:`judge` compares the two arms on every metric of an :class:`AnalysisSpec` and returns a
  :class:`Judgment` carrying its evidence (samples, estimates, intervals, the rule applied);
* :func:`decide` turns a rollout's judgment history into one action for the controller.

Statistics (all intervals two-sided at ``confidence``, 98 % by default, so 1 % per tail):

* continuous metrics (latencies, scores): the Hodges-Lehmann shift, the median of all pairwise
  differences ``candidate_j - stable_i``, with its distribution-free interval from the
  Mann-Whitney U distribution (Lehmann; normal approximation with continuity correction, which
  is accurate for the >= 10 samples per arm the spec enforces), plus the Mann-Whitney U test
  itself for the record. A relative tolerance is read against the stable median;
* proportions (error rate, accuracy): the difference of proportions with Newcombe's hybrid
  score interval (his method 10), built from the two Wilson intervals; it keeps its coverage
  for rare events and small counts where the Wald interval collapses.

Classification rule, in the harmful orientation (for a harmful decrease, flip the signs):

* **fail** when the whole interval lies beyond the tolerance (``lower > tolerance``): we are at
  least 99 % sure the harm exceeds the tolerance;
* **pass** when the point estimate is within the tolerance;
* **inconclusive** in between (estimate beyond the tolerance, interval reaching within it):
  the judgment is ``nodata`` and the rollout holds at its weight until more data decide;
* **nodata** with fewer than ``min_samples`` per arm.

Only the harmful direction counts: an improvement of any size passes.

Why this rule. Measured on the acceptance simulation (tests/test_canary_judge.py, 500 seeded
rollouts per case, default analysis):

=====================================  ==========  ================  ===============
rule                                   identical   accuracy -10 pt   latency +50 %
                                       rolled back rolled back       rolled back
=====================================  ==========  ================  ===============
Kayenta: interval excludes 0 and       11 %        100 %             100 %
estimate beyond tolerance; else pass
whole interval beyond tolerance;       0 %         82 %              99 %
else pass
**chosen**: as above, but hold while   0 %         100 %             100 %
the estimate is beyond tolerance
=====================================  ==========  ================  ===============

Kayenta's rule fails a metric on a 1 % tail whenever ``z * SE`` is near the tolerance, the usual
case at a few hundred samples; a rollout makes many judgments over several metrics, and
critical ones roll back at once, so identical versions were rolled back in 11 % of rollouts.
Requiring the whole interval beyond the tolerance makes a false failure far rarer than 1 % per
judgment, but at ~200 samples a bad candidate's interval often still reaches the tolerance,
and if that counted as a pass it advanced (18 % of 10-point-worse candidates were promoted).
Holding instead is what an engineer watching the graphs would do: do not advance on a worrying
estimate, do not roll back before the evidence is conclusive; the window grows until one of the
two happens, or the no-data timer pauses the rollout for a person. Holding accumulates evidence
only if the judged window grows within a step: the controller should judge the samples since
the step began (as the simulation does), not a sliding window of fixed length.

The simulation's traffic is 3,000 requests and 100 probes per version a minute. At 1,000
requests and 50 probes a minute, the same rule rolled back 0 % of identical candidates (1 %
paused), 97 % of the 10-point-worse ones (3 % paused) and 100 % of the slower ones; with less
traffic than ``min_samples`` per step in ``nodata_pause_s``, rollouts pause rather than decide.

Combining: the score is ``100 * (weight of passing metrics) / (weight of conclusive metrics)``.
The judgment fails if a critical metric fails or the score is below ``marginal_threshold`` even
counting every inconclusive metric as passing; it is ``nodata`` (inconclusive, never a
failure) when a metric is inconclusive, a critical metric lacks data (a rollout never advances
without evidence on a metric whose failure alone would roll it back) or no metric has data;
otherwise marginal below ``pass_threshold`` and pass from it. Non-critical metrics without
data (sparse feedback) are left out of the score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from peftserve.canary.spec import Action, AnalysisSpec, DecisionPolicy, MetricSpec, Rollout

Classification = Literal["pass", "fail", "inconclusive", "nodata"]
Result = Literal["pass", "marginal", "fail", "nodata", "error"]

_BRUTE_FORCE_PAIRS = 1 << 15
"""Up to this many pairwise differences the HL order statistics are taken by brute force."""


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Counts:
    """A proportion's data as counts: ``events`` of ``total`` requests (e.g. errors)."""

    events: int
    total: int

    def __post_init__(self) -> None:
        for name in ("events", "total"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"Counts.{name} must be a non-negative integer, not {v!r}")
            object.__setattr__(self, name, int(v))  # numpy integers are not JSON-serializable
        if self.events > self.total:
            raise ValueError(f"Counts.events ({self.events}) exceeds total ({self.total})")


ArmData = Counts | Sequence[float] | np.ndarray
"""One arm's data: values (continuous), 0/1 outcomes or :class:`Counts` (proportion)."""


@dataclass(frozen=True)
class MetricSamples:
    """Both arms' data for one metric over the judged window."""

    stable: ArmData
    candidate: ArmData


# --------------------------------------------------------------------------- statistics


def z_value(confidence: float) -> float:
    """Two-sided normal quantile: 2.326 for 0.98."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(events: int, total: int, confidence: float = 0.98) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``events / total``."""
    if total <= 0:
        raise ValueError("a proportion needs at least one observation")
    z = z_value(confidence)
    p = events / total
    denom = 1.0 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def newcombe_interval(
    candidate: Counts, stable: Counts, confidence: float = 0.98
) -> tuple[float, float, float]:
    """Difference ``p_candidate - p_stable`` and Newcombe's hybrid score interval (method 10).

    Returns ``(difference, lower, upper)``. Each bound combines the two Wilson intervals'
    distances on the side it moves toward (Newcombe 1998, Statistics in Medicine 17:873).
    """
    p1, p2 = candidate.events / candidate.total, stable.events / stable.total
    l1, u1 = wilson_interval(candidate.events, candidate.total, confidence)
    l2, u2 = wilson_interval(stable.events, stable.total, confidence)
    d = p1 - p2
    return d, d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def _ranks(z: np.ndarray) -> tuple[np.ndarray, float]:
    """Average ranks (1-based) of ``z`` and the tie term ``sum(t**3 - t)`` over tie groups."""
    order = np.argsort(z, kind="mergesort")
    zs = z[order]
    new = np.empty(zs.size, dtype=bool)
    new[0] = True
    np.not_equal(zs[1:], zs[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, zs.size))
    avg = starts + (counts + 1) / 2.0
    ranks = np.empty(zs.size)
    ranks[order] = np.repeat(avg, counts)
    return ranks, float(np.sum(counts.astype(float) ** 3 - counts))


def mann_whitney_u(candidate: np.ndarray, stable: np.ndarray) -> tuple[float, float]:
    """Mann-Whitney U of ``candidate`` against ``stable`` and its two-sided p-value.

    ``U = #{candidate > stable} + 0.5 * #{ties}`` over all pairs; the p-value uses the normal
    approximation with tie and continuity corrections, the same as
    ``scipy.stats.mannwhitneyu(candidate, stable, method="asymptotic")``.
    """
    y, x = np.asarray(candidate, float), np.asarray(stable, float)
    n1, n2 = y.size, x.size
    if n1 == 0 or n2 == 0:
        raise ValueError("Mann-Whitney needs at least one sample per arm")
    ranks, ties = _ranks(np.concatenate([y, x]))
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    n = n1 + n2
    mu = n1 * n2 / 2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return u1, 1.0
    z = (max(u1, n1 * n2 - u1) - mu - 0.5) / math.sqrt(var)
    return u1, min(1.0, math.erfc(z / math.sqrt(2)))


def _count_le(y: np.ndarray, x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """For each threshold in ``d``: #{(i, j): y_j - x_i <= d} (``x``, ``y`` sorted ascending)."""
    # y_j - x_i <= d  <=>  x_i >= y_j - d: count of x at or above each y_j - d.
    q = y[None, :] - d[:, None]  # [K, m]
    below = np.searchsorted(x, q.ravel(), side="left").reshape(q.shape)
    return (x.size - below).sum(axis=1)


def pairwise_order_statistics(candidate: np.ndarray, stable: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """The ``ks``-th smallest (1-based) of all ``candidate_j - stable_i``, exactly.

    Brute force for small samples; otherwise bisection on the value, counting pairs with
    ``searchsorted`` (O((n + m) log n) per step, never the n*m differences), until few enough
    pairs remain in the bracket to enumerate them. Memory stays O(n + m).
    """
    y, x = np.sort(np.asarray(candidate, float)), np.sort(np.asarray(stable, float))
    m, n = y.size, x.size
    ks_arr = np.asarray(ks, dtype=np.int64)
    if np.any(ks_arr < 1) or np.any(ks_arr > n * m):
        raise ValueError(f"order statistics {list(ks)} outside 1..{n * m}")
    if n * m <= _BRUTE_FORCE_PAIRS:
        d = np.subtract.outer(y, x).ravel()
        return np.partition(d, ks_arr - 1)[ks_arr - 1]
    lo, hi, c_lo, c_hi = _initial_brackets(y, x, ks_arr)
    budget = max(4 * (n + m), 1 << 14)
    value = np.full(ks_arr.size, np.nan)  # set once a bracket holds a single distinct value
    for it in range(200):
        open_ = (c_hi - c_lo > budget) & np.isnan(value)
        if not open_.any():
            break
        mid = lo + (hi - lo) / 2
        stalled = (mid <= lo) | (mid >= hi)  # lo, hi adjacent floats
        if it % 8 == 7 or (open_ & stalled).any():
            # Runs of tied differences (discrete data) stop the count from shrinking; detect a
            # bracket that holds one distinct value instead of bisecting to float resolution.
            single, v = _single_value(y, x, lo, hi)
            value = np.where(open_ & single, v, value)
            open_ &= ~single
        active = open_ & ~stalled
        if not active.any():
            break
        c_mid = _count_le(y, x, mid)
        go_low = active & (c_mid >= ks_arr)
        go_high = active & (c_mid < ks_arr)
        hi, c_hi = np.where(go_low, mid, hi), np.where(go_low, c_mid, c_hi)
        lo, c_lo = np.where(go_high, mid, lo), np.where(go_high, c_mid, c_lo)
    out = value.copy()
    todo = [t for t in range(ks_arr.size) if np.isnan(value[t])]
    while todo:
        # Targets sharing a bracket (the two middle ranks, usually) are enumerated once.
        t0 = todo[0]
        group = [t for t in todo if lo[t] == lo[t0] and hi[t] == hi[t0]]
        todo = [t for t in todo if t not in group]
        # pairs with lo < y_j - x_i <= hi  <=>  y_j - hi <= x_i < y_j - lo
        left = np.searchsorted(x, y - hi[t0], side="left")
        right = np.searchsorted(x, y - lo[t0], side="left")
        counts = right - left
        rows = np.repeat(np.arange(m), counts)
        cols = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(left, counts)
        r = [int(ks_arr[t] - c_lo[t] - 1) for t in group]
        vals = np.partition(y[rows] - x[cols], r)
        out[group] = vals[r]
    return out


def _initial_brackets(
    y: np.ndarray, x: np.ndarray, ks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Brackets ``(lo, hi]`` with ``count_le(lo) < k <= count_le(hi)`` for each target rank.

    Guessed from the quantiles of a fixed sample of 2,048 pairs (+-4 standard errors), which
    leaves about a tenth of the pairs in the bracket; where a guess misses, the bracket
    falls back to one strictly below / at or above every difference. The sample only affects
    speed: the result is exact either way.
    """
    n, m = x.size, y.size
    total = n * m
    span = (y[-1] - x[0]) - (y[0] - x[-1])
    floor_, ceil_ = (y[0] - x[-1]) - span - 1.0, (y[-1] - x[0]) + span + 1.0
    # A Fibonacci lattice over the (sorted) n x m grid of pairs: spread like a quasi-random
    # sample, deterministic, and cheaper than drawing random indices.
    s = 2048
    t = np.arange(s)
    rows = (t * m) // s
    cols = (np.modf(t * 0.6180339887498949)[0] * n).astype(np.int64)
    sample = np.sort(y[rows] - x[cols])
    q = ks / total
    half = 4.0 * np.sqrt(q * (1 - q) / s) + 2.0 / s
    i_lo = np.floor((q - half) * s).astype(np.int64)
    i_hi = np.ceil((q + half) * s).astype(np.int64)
    lo = np.where(i_lo >= 0, sample[np.clip(i_lo, 0, s - 1)], floor_)
    hi = np.where(i_hi < s, sample[np.clip(i_hi, 0, s - 1)], ceil_)
    c = _count_le(y, x, np.concatenate([lo, hi]))
    c_lo, c_hi = c[: ks.size], c[ks.size :]
    bad_lo, bad_hi = c_lo >= ks, c_hi < ks
    lo, c_lo = np.where(bad_lo, floor_, lo), np.where(bad_lo, 0, c_lo)
    hi, c_hi = np.where(bad_hi, ceil_, hi), np.where(bad_hi, total, c_hi)
    return lo, hi, c_lo, c_hi


def _single_value(y: np.ndarray, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per bracket (lo, hi]: whether all differences in it are equal, and that value."""
    n = x.size
    left = np.searchsorted(x, (y[None, :] - hi[:, None]).ravel(), side="left").reshape(-1, y.size)
    right = np.searchsorted(x, (y[None, :] - lo[:, None]).ravel(), side="left").reshape(-1, y.size)
    # Largest difference <= hi in row j uses the smallest x >= y_j - hi (index left_j); the
    # smallest difference > lo uses the largest x < y_j - lo (index right_j - 1).
    top = np.where(left < n, y[None, :] - x[np.minimum(left, n - 1)], -np.inf).max(axis=1)
    bottom = np.where(right > 0, y[None, :] - x[np.maximum(right - 1, 0)], np.inf).min(axis=1)
    return bottom >= top, top


def hl_interval_ranks(n_candidate: int, n_stable: int, confidence: float = 0.98) -> tuple[int, int]:
    """1-based ranks ``(k, nm + 1 - k)`` of the pairwise differences bounding the HL interval.

    Under a pure shift, ``P(d_(k) > shift) = P(U <= k - 1)`` with U Mann-Whitney distributed;
    the normal approximation with continuity correction gives
    ``k = floor(nm/2 + 0.5 - z * sqrt(nm (n + m + 1) / 12))``. Rounding down widens the interval
    (conservative). Ties are ignored here, which also only widens it.
    """
    nm = n_candidate * n_stable
    sd = math.sqrt(nm * (n_candidate + n_stable + 1) / 12)
    k = math.floor(nm / 2 + 0.5 - z_value(confidence) * sd)
    k = min(max(k, 1), (nm + 1) // 2)
    return k, nm + 1 - k


def hodges_lehmann(candidate: np.ndarray, stable: np.ndarray, confidence: float = 0.98) -> tuple[float, float, float]:
    """Hodges-Lehmann shift ``candidate - stable`` and its distribution-free interval.

    Returns ``(estimate, lower, upper)``: the median of all pairwise differences and the
    order statistics of :func:`hl_interval_ranks`.
    """
    y, x = np.asarray(candidate, float), np.asarray(stable, float)
    nm = y.size * x.size
    if nm == 0:
        raise ValueError("Hodges-Lehmann needs at least one sample per arm")
    k_lo, k_hi = hl_interval_ranks(y.size, x.size, confidence)
    mid_lo, mid_hi = (nm + 1) // 2, nm // 2 + 1  # equal when nm is odd
    ranks = sorted({k_lo, k_hi, mid_lo, mid_hi})
    v = dict(zip(ranks, pairwise_order_statistics(y, x, ranks), strict=True))
    return float((v[mid_lo] + v[mid_hi]) / 2), float(v[k_lo]), float(v[k_hi])


# --------------------------------------------------------------------------- judgment


@dataclass(frozen=True)
class MetricResult:
    """Evidence on one metric: what was compared, what came out, and the verdict."""

    name: str
    kind: str
    direction: str
    """The harmful direction (increase or decrease)."""
    critical: bool
    weight: float
    classification: Classification
    n_stable: int
    n_candidate: int
    stable_value: float | None = None
    """Stable median (continuous) or proportion."""
    candidate_value: float | None = None
    """Candidate median (continuous) or proportion."""
    estimate: float | None = None
    """candidate - stable: Hodges-Lehmann shift or difference of proportions."""
    interval: tuple[float, float] | None = None
    """Confidence interval of ``estimate``."""
    tolerance: float | None = None
    """Tolerance in metric units (relative tolerances already multiplied by the stable value)."""
    p_value: float | None = None
    """Two-sided p-value (Mann-Whitney, or the pooled two-proportion z-test), for the record."""
    detail: str = ""
    """One line a person can read: numbers, rule and verdict."""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["interval"] = list(self.interval) if self.interval is not None else None
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricResult:
        d = dict(data)
        if d.get("interval") is not None:
            d["interval"] = tuple(d["interval"])
        return cls(**d)


@dataclass(frozen=True)
class Judgment:
    """One comparison of candidate with stable over a window, with its evidence."""

    result: Result
    """pass, marginal, fail, nodata (inconclusive) or error (the evaluator failed)."""
    score: float | None
    """0-100: weighted share of passing metrics among those with data (None without data)."""
    reason: str
    """Why, naming the deciding metric and its numbers."""
    metrics: tuple[MetricResult, ...] = ()
    at: float = 0.0
    """When the judgment was made (epoch seconds)."""

    @property
    def failed_critical(self) -> tuple[str, ...]:
        """Names of the critical metrics that failed."""
        return tuple(m.name for m in self.metrics if m.critical and m.classification == "fail")

    @property
    def has_data(self) -> bool:
        """Whether the judgment reached a verdict on the candidate (pass, marginal or fail)."""
        return self.result in ("pass", "marginal", "fail")

    @classmethod
    def error(cls, message: str, at: float = 0.0) -> Judgment:
        """The record of an evaluator error (missing metrics backend, exception...); never a failure."""
        return cls("error", None, f"error: {message}", (), at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "score": self.score,
            "reason": self.reason,
            "metrics": [m.to_dict() for m in self.metrics],
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Judgment:
        if data.get("result") not in ("pass", "marginal", "fail", "nodata", "error"):
            raise ValueError(f"judgment result must be pass, marginal, fail, nodata or error, not {data.get('result')!r}")
        return cls(
            result=data["result"],
            score=data.get("score"),
            reason=data["reason"],
            metrics=tuple(MetricResult.from_dict(m) for m in data.get("metrics", ())),
            at=data.get("at", 0.0),
        )


def _fmt(v: float) -> str:
    return f"{v:+.4g}"


def _values(metric: MetricSpec, data: ArmData, arm: str) -> np.ndarray:
    if isinstance(data, Counts):
        raise ValueError(f"{metric.name}: a continuous metric needs values, not counts ({arm} arm)")
    v = np.asarray(data, dtype=float).ravel()
    bad = int(np.count_nonzero(~np.isfinite(v)))
    if bad:
        raise ValueError(f"{metric.name}: {bad} non-finite value(s) in the {arm} arm")
    return v


def _counts(metric: MetricSpec, data: ArmData, arm: str) -> Counts:
    if isinstance(data, Counts):
        return data
    v = np.asarray(data).ravel()
    if v.size and not np.all((v == 0) | (v == 1)):
        raise ValueError(f"{metric.name}: a proportion needs 0/1 outcomes ({arm} arm)")
    return Counts(int(np.count_nonzero(v)), int(v.size))


def _size(metric: MetricSpec, data: ArmData | None) -> int:
    if data is None:
        return 0
    if isinstance(data, Counts):
        return data.total
    return int(np.asarray(data).size)


def _verdict(metric: MetricSpec, estimate: float, lower: float, upper: float, tol: float) -> Classification:
    """The classification rule (module docstring), in the harmful orientation.

    fail: the whole interval lies beyond the tolerance; pass: the estimate is within it;
    inconclusive: the estimate is beyond the tolerance but the interval still reaches within.
    """
    if metric.direction == "increase":
        harm, harm_low = estimate, lower
    else:
        harm, harm_low = -estimate, -upper
    if harm_low > tol:
        return "fail"
    return "inconclusive" if harm > tol else "pass"


def _evaluate(metric: MetricSpec, samples: MetricSamples | None, analysis: AnalysisSpec) -> MetricResult:
    """Compare both arms on one metric."""
    n_s = _size(metric, samples.stable if samples else None)
    n_c = _size(metric, samples.candidate if samples else None)
    base = {"name": metric.name, "kind": metric.kind, "direction": metric.direction,
            "critical": metric.critical, "weight": metric.weight, "n_stable": n_s, "n_candidate": n_c}
    if min(n_s, n_c) < analysis.min_samples:
        detail = (f"{metric.name}: {n_s} stable / {n_c} candidate samples, fewer than "
                  f"{analysis.min_samples} per arm -> nodata")
        return MetricResult(classification="nodata", detail=detail, **base)
    assert samples is not None  # n_s > 0 implies samples
    sign = "+" if metric.direction == "increase" else "-"
    if metric.kind == "continuous":
        x = _values(metric, samples.stable, "stable")
        y = _values(metric, samples.candidate, "candidate")
        est, lo, hi = hodges_lehmann(y, x, analysis.confidence)
        _, p = mann_whitney_u(y, x)
        s_val, c_val = float(np.median(x)), float(np.median(y))
        tol = metric.tolerance * abs(s_val) if metric.relative else metric.tolerance
        rel = f" ({est / s_val:+.1%} of the stable median)" if s_val else ""
        what = (f"medians {s_val:.4g} -> {c_val:.4g}; HL shift {_fmt(est)} [{_fmt(lo)}, {_fmt(hi)}]{rel}; "
                f"Mann-Whitney p={p:.2g}")
    else:
        ks, kc = _counts(metric, samples.stable, "stable"), _counts(metric, samples.candidate, "candidate")
        est, lo, hi = newcombe_interval(kc, ks, analysis.confidence)
        s_val, c_val = ks.events / ks.total, kc.events / kc.total
        pooled = (ks.events + kc.events) / (ks.total + kc.total)
        se = math.sqrt(pooled * (1 - pooled) * (1 / ks.total + 1 / kc.total))
        p = math.erfc(abs(est) / se / math.sqrt(2)) if se > 0 else 1.0
        tol = metric.tolerance * s_val if metric.relative else metric.tolerance
        what = (f"{s_val:.4g} ({ks.events}/{ks.total}) -> {c_val:.4g} ({kc.events}/{kc.total}); "
                f"difference {_fmt(est)} [{_fmt(lo)}, {_fmt(hi)}]")
    verdict = _verdict(metric, est, lo, hi, tol)
    rel_tol = f" ({metric.tolerance:g} relative)" if metric.relative else ""
    rule = {"fail": "whole interval beyond the tolerance",
            "inconclusive": "estimate beyond the tolerance, interval reaching within it",
            "pass": "estimate within the tolerance"}[verdict]
    detail = (f"{metric.name}: {what}; tolerance {sign}{tol:.4g}{rel_tol}, harmful {metric.direction}; "
              f"{rule} -> {verdict}")
    return MetricResult(classification=verdict, stable_value=s_val, candidate_value=c_val, estimate=est,
                        interval=(lo, hi), tolerance=tol, p_value=p, detail=detail, **base)


def harm_margin(m: MetricResult) -> float:
    """How far the interval's harmful bound is past the tolerance, in interval widths (> 0: fail);
    -inf for a metric without an interval."""
    if m.interval is None or m.tolerance is None:
        return float("-inf")
    lo, hi = m.interval
    width = (hi - lo) or 1.0
    return (lo - m.tolerance) / width if m.direction == "increase" else (-m.tolerance - hi) / width


def judge(analysis: AnalysisSpec, data: Mapping[str, MetricSamples], at: float = 0.0) -> Judgment:
    """Judge candidate against stable on every metric of ``analysis``.

    ``data`` maps metric names to both arms' samples over the same window; a metric missing
    from it has no data. Invalid samples (non-finite values, outcomes other than 0/1, counts
    for a continuous metric) raise ``ValueError``: the controller records that as an evaluator
    error (:meth:`Judgment.error`), never as a failure.
    """
    unknown = sorted(set(data) - {m.name for m in analysis.metrics})
    if unknown:
        raise ValueError(f"data for metrics not in the analysis: {', '.join(unknown)}")
    results = tuple(_evaluate(m, data.get(m.name), analysis) for m in analysis.metrics)
    with_data = [r for r in results if r.classification != "nodata"]
    conclusive = [r for r in with_data if r.classification != "inconclusive"]
    pending = [r for r in with_data if r.classification == "inconclusive"]
    failed = sorted((r for r in conclusive if r.classification == "fail"), key=harm_margin, reverse=True)
    w_pass = sum(r.weight for r in conclusive if r.classification == "pass")
    w_data = sum(r.weight for r in with_data)
    # Score over the conclusive metrics; ``best`` counts the inconclusive ones as passing, the
    # most they can still bring, so a judgment already lost whatever they turn out to be fails now.
    score = 100.0 * w_pass / (w_data - sum(r.weight for r in pending)) if conclusive else None
    best = 100.0 * (w_pass + sum(r.weight for r in pending)) / w_data if with_data else None

    critical_failed = [r for r in failed if r.critical]
    if critical_failed:
        names = ", ".join(r.name for r in critical_failed)
        return Judgment("fail", score, f"fail: critical metric(s) {names} failed; {critical_failed[0].detail}",
                        results, at)
    if best is not None and best < analysis.marginal_threshold:
        reason = (f"fail: score {score:.1f} < {analysis.marginal_threshold:g}"
                  if not pending else f"fail: score at most {best:.1f} < {analysis.marginal_threshold:g}")
        return Judgment("fail", score, reason + "; " + "; ".join(r.detail for r in failed), results, at)
    missing_critical = [r for r in results if r.critical and r.classification == "nodata"]
    if pending:
        r = max(pending, key=harm_margin)
        return Judgment("nodata", score, f"nodata: inconclusive, holding for more data; {r.detail}", results, at)
    if not with_data or missing_critical:
        r = missing_critical[0] if missing_critical else min(results, key=lambda r: min(r.n_stable, r.n_candidate))
        prefix = "critical metric without enough data" if missing_critical else "no metric has enough data"
        return Judgment("nodata", score, f"nodata: {prefix}; {r.detail}", results, at)
    assert score is not None  # with_data and nothing pending: every metric with data is conclusive
    if score < analysis.pass_threshold:
        reason = (f"marginal: score {score:.1f} in [{analysis.marginal_threshold:g}, "
                  f"{analysis.pass_threshold:g}); " + "; ".join(r.detail for r in failed))
        return Judgment("marginal", score, reason, results, at)
    if failed:
        reason = f"pass: score {score:.1f} >= {analysis.pass_threshold:g} despite {failed[0].detail}"
    else:
        closest = max(with_data, key=harm_margin)
        reason = (f"pass: score {score:.1f}; all {len(with_data)} metrics with data within tolerance; "
                  f"closest: {closest.detail}")
    return Judgment("pass", score, reason, results, at)


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class Decision:
    """What the controller should do now, and why."""

    action: Action
    """advance, hold, pause, promote or rollback."""
    reason: str


def _trailing(history: Sequence[Judgment], result: str, skip: tuple[str, ...] = ()) -> int:
    """Number of ``result`` judgments at the end of ``history``, stepping over ``skip`` results."""
    count = 0
    for j in reversed(history):
        if j.result == result:
            count += 1
        elif j.result not in skip:
            break
    return count


def decide(rollout: Rollout, history: Sequence[Judgment], now: float,
           policy: DecisionPolicy | None = None) -> Decision:
    """The controller's next action for ``rollout`` given its judgments so far (oldest first).

    Rules, in order (``policy`` defaults to the rollout's own):

    1. paused or terminal rollouts are left alone (a person resumes a paused one);
    2. a failed critical metric in the latest judgment rolls back at once;
    3. ``max_failed`` failed judgments over the whole rollout roll back;
    4. ``max_errors_in_row`` evaluator errors in a row pause (an error says nothing about the
       candidate, so it is never a failure);
    5. ``max_marginal_in_row`` marginal judgments in a row pause (errors in between are skipped);
    6. inconclusive for lack of data for ``nodata_pause_s`` since the step began or the last
       judgment with data pauses;
    7. a pass made during the current step, once the step's ``step_interval_s`` has elapsed,
       advances, or promotes at the last step;
    8. anything else holds.
    """
    policy = policy or rollout.spec.policy
    if rollout.state not in ("shadow", "ramping"):
        return Decision("hold", f"rollout is {rollout.state}; nothing to decide")
    if not history:
        return Decision("hold", "no judgment yet")
    latest = history[-1]
    if latest.failed_critical and policy.rollback_on_critical:
        return Decision("rollback", f"critical metric failed: {latest.reason}")
    n_failed = sum(1 for j in history if j.result == "fail")
    if n_failed >= policy.max_failed:
        return Decision("rollback", f"{n_failed} failed judgments (limit {policy.max_failed}); last: "
                        + next(j.reason for j in reversed(history) if j.result == "fail"))
    # Streaks count from the step's start: a resume (or an advance) starts a new step, so a
    # person who resumes a paused rollout is not paused again by the streak they looked at.
    in_step = [j for j in history if j.at >= rollout.step_started_at] or [latest]
    if latest.result == "error":
        errors = _trailing(in_step, "error")
        if errors >= policy.max_errors_in_row:
            return Decision("pause", f"{errors} evaluator errors in a row: {latest.reason}")
        return Decision("hold", f"evaluator error {errors} of {policy.max_errors_in_row} before pausing: "
                        f"{latest.reason}")
    marginal = _trailing(in_step, "marginal", skip=("error",))
    if marginal >= policy.max_marginal_in_row:
        return Decision("pause", f"{marginal} marginal judgments in a row; last: {latest.reason}")
    if latest.result == "nodata":
        with_data = [j.at for j in history if j.has_data]
        since = max([rollout.step_started_at, *with_data])
        waited = now - since
        if waited >= policy.nodata_pause_s:
            return Decision("pause", f"no conclusive judgment for {waited:.0f} s "
                            f"(limit {policy.nodata_pause_s:g} s): {latest.reason}")
        return Decision("hold", f"inconclusive for {waited:.0f} s: {latest.reason}")
    if latest.result == "pass":
        if latest.at < rollout.step_started_at:
            return Decision("hold", "latest pass predates the current step; waiting for a new judgment")
        elapsed = now - rollout.step_started_at
        if elapsed < rollout.spec.step_interval_s:
            return Decision("hold", f"pass, but only {elapsed:.0f} s of the step's "
                            f"{rollout.spec.step_interval_s:g} s have elapsed")
        if rollout.state == "ramping" and rollout.is_last_step:
            return Decision("promote", f"last step ({rollout.weight:g} %) passed: {latest.reason}")
        nxt = rollout.spec.steps[rollout.step_index + 1]
        return Decision("advance", f"step passed, advancing to {nxt:g} %: {latest.reason}")
    return Decision("hold", f"{latest.result}: {latest.reason}")
