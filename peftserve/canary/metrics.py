"""Metric windows: what each (task, version) did recently, in the form the judge reads.

The API records every answered request (:meth:`MetricWindows.record_request`, or
:meth:`~MetricWindows.record_route` with the router's decision), the feedback users send on a
completion (:meth:`~MetricWindows.register_completion` when it answers, then
:meth:`~MetricWindows.record_feedback`), and the shadow copies it runs
(:meth:`~MetricWindows.record_shadow`, :meth:`~MetricWindows.record_noise_floor`); the
controller records its probes (:meth:`~MetricWindows.record_probe`). Once per judgment the
controller asks :meth:`~MetricWindows.samples` for both arms' data since the current step
began, keyed by the metric names of the rollout's analysis.

Metrics this module can produce (:data:`METRICS`; a spec naming another is refused when the
rollout starts, see :func:`check_metrics`):

================== =========== ==============================================================
name               kind        one sample per
================== =========== ==============================================================
error_rate         proportion  request: 1 when it failed (exception or non-finite logits)
non_finite         proportion  request: 1 when its logits were non-finite (also an error)
finish_<reason>    proportion  request: 1 when it finished with <reason> (``finish_length``...)
latency_e2e        continuous  completed request: seconds from arrival to last token
ttft               continuous  request with a first token: seconds to it
tpot               continuous  completed request: mean seconds per output token after the first
output_tokens      continuous  completed request: tokens generated
feedback_score     continuous  completion with feedback: its score in [0, 1]
probe_accuracy     proportion  probe: 1 when the answer matched the expected one exactly
shadow_divergence  continuous  shadow copy with an LLR; the stable arm is the noise floor
================== =========== ==============================================================

"Completed" excludes failed requests and those the client aborted (finish reason ``abort``),
whose latency and length say nothing about the version.

Windows are by the time a sample is recorded: a request when it is answered, feedback when
it arrives (so a score sent during step 2 on an answer of step 1 counts in step 2's window).

Which requests count: only those the router placed by its hash (``RouteDecision.in_experiment``),
the randomized comparison. Pinned (``task@version``), overridden (``X-Canary``) and untargeted
requests are recorded with ``in_experiment=False``: they appear in :meth:`~MetricWindows.summary`
but never in the judged arms, since their users chose (or were chosen for) the version.

Shadow phase: at weight 0 the candidate serves no user, so its request metrics come from the
shadow copies (``samples(..., shadow=True)``): each copy is the candidate answering a stable
request of the cohort, picked by an independent hash. The copies run beside their stable
request, so their latency includes that extra load; the comparison is a conservative one.

Memory is bounded: every series is a ``deque`` with ``max_samples`` entries, and
:meth:`~MetricWindows.prune` (called by the controller each round) drops samples older than
the oldest window still being judged. Completions awaiting feedback expire after
``feedback_ttl_s`` (default one hour) and are capped at ``max_completions``. All methods are
thread-safe (one lock); the lock is never held while arrays are built or the judge runs.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftserve.canary.judge import Counts, MetricSamples
from peftserve.canary.router import RouteDecision
from peftserve.canary.spec import AnalysisSpec, MetricSpec, RolloutSpecError

METRICS: dict[str, str] = {
    "error_rate": "proportion",
    "non_finite": "proportion",
    "latency_e2e": "continuous",
    "ttft": "continuous",
    "tpot": "continuous",
    "output_tokens": "continuous",
    "feedback_score": "continuous",
    "probe_accuracy": "proportion",
    "shadow_divergence": "continuous",
}
"""Metric name -> kind, for the names :meth:`MetricWindows.samples` produces (plus ``finish_<reason>``)."""

FINISH_PREFIX = "finish_"
"""``finish_<reason>``: share of requests that finished with ``<reason>`` (proportion)."""

ABORTED = "abort"
"""Finish reason of a request the client gave up on: left out of latency and length."""


def metric_kind(name: str) -> str | None:
    """The kind (``continuous`` or ``proportion``) of a metric this module produces, else None."""
    if name in METRICS:
        return METRICS[name]
    if name.startswith(FINISH_PREFIX) and len(name) > len(FINISH_PREFIX):
        return "proportion"
    return None


def check_metrics(metrics: Iterable[MetricSpec]) -> None:
    """Refuse (:class:`RolloutSpecError`, 400) metrics the windows cannot produce or of the wrong kind.

    A metric nobody records would stay without data forever: a critical one would hold the
    rollout until it pauses, a non-critical one would silently never count.
    """
    for m in metrics:
        kind = metric_kind(m.name)
        if kind is None:
            known = ", ".join([*METRICS, f"{FINISH_PREFIX}<reason>"])
            raise RolloutSpecError(f"unknown metric {m.name!r}; the metric windows record: {known}")
        if kind != m.kind:
            raise RolloutSpecError(f"metric {m.name!r} is a {kind} metric, not {m.kind}")


# --------------------------------------------------------------------------- samples


@dataclass(slots=True)
class RequestSample:
    """One answered request of a version."""

    at: float
    in_experiment: bool
    error: bool
    non_finite: bool
    ttft: float | None
    tpot: float | None
    e2e: float | None
    output_tokens: int | None
    finish_reason: str | None
    replica: str = ""
    """The engine replica that served it (Ray Serve composition); empty in one process."""

    @property
    def completed(self) -> bool:
        """Finished without error and not aborted: its latency and length describe the version."""
        return not self.error and self.finish_reason != ABORTED


@dataclass(slots=True)
class FeedbackSample:
    """A user's score of one completion (the last one sent counts)."""

    at: float
    score: float
    in_experiment: bool


@dataclass(slots=True)
class ProbeSample:
    at: float
    correct: bool


@dataclass(slots=True)
class ShadowSample:
    """The candidate's answer to a copy of a stable request."""

    at: float
    stable: str
    exact_match: bool
    llr: float | None
    e2e: float | None
    ttft: float | None
    error: bool
    non_finite: bool
    output_tokens: int | None

    @property
    def completed(self) -> bool:
        return not self.error


@dataclass(slots=True)
class NoiseSample:
    """Divergence of stable from itself on one request (the baseline of ``shadow_divergence``)."""

    at: float
    llr: float


@dataclass(slots=True)
class _Completion:
    task: str
    version: str
    arm: str | None
    in_experiment: bool
    registered_at: float
    feedback: FeedbackSample | None = None


def _finite(value: float | None) -> float | None:
    """``value`` as a float, or None when missing or not finite (the judge refuses non-finite data)."""
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _since(series: deque, since: float) -> list:
    """The samples of ``series`` (oldest first) recorded after ``since``.

    Strictly after: a sample stamped with the very time a step began was taken before the
    transition (the controller reads its clock after the round's traffic and probes).
    """
    out = []
    for s in reversed(series):
        if s.at <= since:
            break
        out.append(s)
    out.reverse()
    return out


def _prune(series: deque, before: float) -> None:
    while series and series[0].at < before:
        series.popleft()


def _proportion(flags: list[bool]) -> Counts:
    return Counts(sum(flags), len(flags))


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


class MetricWindows:
    """Per (task, version) windows of request, feedback, probe and shadow samples.

    ``clock`` stamps samples recorded without an explicit ``at`` (tests pass a fake clock);
    ``max_samples`` bounds each series; ``feedback_ttl_s`` is how long a completion id accepts
    feedback, ``max_completions`` how many ids are remembered at most (the oldest go first).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        max_samples: int = 50_000,
        feedback_ttl_s: float = 3600.0,
        max_completions: int = 200_000,
    ) -> None:
        if max_samples < 1 or max_completions < 1:
            raise ValueError("max_samples and max_completions must be at least 1")
        if not feedback_ttl_s > 0:
            raise ValueError(f"feedback_ttl_s must be > 0, not {feedback_ttl_s}")
        self._clock = clock
        self._max = max_samples
        self.feedback_ttl_s = feedback_ttl_s
        self._max_completions = max_completions
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], deque[RequestSample]] = {}
        self._feedback: dict[tuple[str, str], deque[FeedbackSample]] = {}
        self._probes: dict[tuple[str, str], deque[ProbeSample]] = {}
        self._shadow: dict[tuple[str, str], deque[ShadowSample]] = {}
        self._noise: dict[str, deque[NoiseSample]] = {}
        self._completions: OrderedDict[str, _Completion] = OrderedDict()

    def _series(self, table: dict, key: Any) -> deque:
        series = table.get(key)
        if series is None:
            series = table[key] = deque(maxlen=self._max)
        return series

    def _now(self, at: float | None) -> float:
        return self._clock() if at is None else float(at)

    # ---- recording ----------------------------------------------------------------------

    def record_request(
        self,
        task: str,
        version: str,
        *,
        in_experiment: bool = True,
        error: bool = False,
        non_finite: bool = False,
        ttft: float | None = None,
        tpot: float | None = None,
        e2e: float | None = None,
        output_tokens: int | None = None,
        finish_reason: str | None = None,
        replica: str = "",
        at: float | None = None,
    ) -> None:
        """Record one answered (or failed) request served by ``task@version``.

        ``in_experiment``: the router placed it by hash (``RouteDecision.in_experiment``); pass
        False for pins, overrides, untargeted requests and fallbacks answered by stable after
        a candidate failure, so they are kept for display but left out of the judgment.
        ``non_finite`` implies ``error``. Non-finite timings are dropped (never judged).
        ``replica``: the engine replica that answered (summaries count samples per replica).
        """
        sample = RequestSample(
            self._now(at), bool(in_experiment), bool(error or non_finite), bool(non_finite),
            _finite(ttft), _finite(tpot), _finite(e2e),
            int(output_tokens) if output_tokens is not None else None, finish_reason, str(replica),
        )
        with self._lock:
            self._series(self._requests, (task, version)).append(sample)

    def record_route(self, decision: RouteDecision, **outcome: Any) -> None:
        """:meth:`record_request` for a routed request: task, version and experiment flag from ``decision``."""
        self.record_request(decision.task, decision.version, in_experiment=decision.in_experiment, **outcome)

    def register_completion(
        self,
        completion_id: str,
        task: str,
        version: str,
        *,
        arm: str | None = None,
        in_experiment: bool = True,
        at: float | None = None,
    ) -> None:
        """Remember which version answered ``completion_id``, so feedback on it can be attributed."""
        now = self._now(at)
        with self._lock:
            self._expire(now)
            self._completions[completion_id] = _Completion(task, version, arm, bool(in_experiment), now)
            self._completions.move_to_end(completion_id)
            while len(self._completions) > self._max_completions:
                self._completions.popitem(last=False)

    def record_feedback(self, completion_id: str, score: float | bool, *, at: float | None = None) -> bool:
        """Record a user's score (a number in [0, 1], or a bool) for a completion.

        Returns False when the id is unknown or expired (older than ``feedback_ttl_s``): the API
        answers 404. A second score for the same completion replaces the first, so one user
        cannot weigh in twice. Raises ``ValueError`` for a score outside [0, 1] (the API: 400).
        """
        if isinstance(score, bool):
            value = 1.0 if score else 0.0
        elif isinstance(score, (int, float)) and math.isfinite(score) and 0.0 <= score <= 1.0:
            value = float(score)
        else:
            raise ValueError(f"feedback score must be true, false or a number in [0, 1], not {score!r}")
        now = self._now(at)
        with self._lock:
            self._expire(now)
            c = self._completions.get(completion_id)
            if c is None:
                return False
            if c.feedback is not None:
                c.feedback.score = value
                return True
            c.feedback = FeedbackSample(now, value, c.in_experiment)
            self._series(self._feedback, (c.task, c.version)).append(c.feedback)
        return True

    def _expire(self, now: float) -> None:
        """Forget completions older than the TTL (the dict is in registration order)."""
        cutoff = now - self.feedback_ttl_s
        while self._completions:
            first = next(iter(self._completions.values()))
            if first.registered_at >= cutoff:
                break
            self._completions.popitem(last=False)

    def record_probe(self, task: str, version: str, correct: bool, *, at: float | None = None) -> None:
        """Record one known-answer probe of ``task@version`` (exact match or not)."""
        with self._lock:
            self._series(self._probes, (task, version)).append(ProbeSample(self._now(at), bool(correct)))

    def record_shadow(
        self,
        task: str,
        stable: str,
        candidate: str,
        exact_match: bool,
        llr: float | None,
        e2e: float | None,
        error: bool,
        out_len: int | None,
        *,
        ttft: float | None = None,
        non_finite: bool = False,
        at: float | None = None,
    ) -> None:
        """Record the candidate's answer to a shadow copy of a stable request.

        ``exact_match``: the candidate's text equals stable's; ``llr``: a divergence score of
        the candidate's answer from stable's (log-likelihood ratio; None when not computed);
        ``e2e``/``ttft`` in seconds, ``out_len`` in tokens; ``error``/``non_finite`` as for requests.
        """
        sample = ShadowSample(
            self._now(at), stable, bool(exact_match), _finite(llr), _finite(e2e), _finite(ttft),
            bool(error or non_finite), bool(non_finite), int(out_len) if out_len is not None else None,
        )
        with self._lock:
            self._series(self._shadow, (task, candidate)).append(sample)

    def record_noise_floor(self, task: str, llr: float, *, at: float | None = None) -> None:
        """Record the divergence of stable from itself (two stable answers to one request).

        It is the baseline of ``shadow_divergence``: sampling noise alone gives this much.
        """
        value = _finite(llr)
        if value is None:
            return
        with self._lock:
            self._series(self._noise, task).append(NoiseSample(self._now(at), value))

    # ---- reading ------------------------------------------------------------------------

    def _requests_since(self, task: str, version: str, since: float, experiment_only: bool = True) -> list[RequestSample]:
        series = self._requests.get((task, version))
        if series is None:
            return []
        return [s for s in _since(series, since) if s.in_experiment or not experiment_only]

    def _noise_since(self, task: str, since: float) -> list[float]:
        return [n.llr for n in _since(self._noise.get(task, deque()), since)]

    def samples(
        self,
        task: str,
        stable: str,
        candidate: str,
        since: float,
        analysis: AnalysisSpec,
        *,
        shadow: bool = False,
    ) -> dict[str, MetricSamples]:
        """Both arms' data for every metric of ``analysis``, from samples recorded after ``since``.

        The result is what :func:`peftserve.canary.judge.judge` takes: proportions as
        :class:`Counts`, continuous metrics as float arrays. A metric whose arms are both empty
        is left out (the judge reads it as no data). ``shadow``: the candidate's request
        metrics come from its shadow copies (the shadow phase, where it serves no user).
        Raises ``ValueError`` for a metric it does not produce (see :func:`check_metrics`).
        """
        with self._lock:
            arms = {
                "stable": self._requests_since(task, stable, since),
                "candidate": (
                    _since(self._shadow.get((task, candidate), deque()), since)
                    if shadow else self._requests_since(task, candidate, since)
                ),
            }
            feedback = {arm: [f.score for f in _since(self._feedback.get((task, v), deque()), since) if f.in_experiment]
                        for arm, v in (("stable", stable), ("candidate", candidate))}
            probes = {arm: [p.correct for p in _since(self._probes.get((task, v), deque()), since)]
                      for arm, v in (("stable", stable), ("candidate", candidate))}
            shadow_llr = [s.llr for s in _since(self._shadow.get((task, candidate), deque()), since)
                          if s.llr is not None]
            noise = self._noise_since(task, since)

        out: dict[str, MetricSamples] = {}
        for m in analysis.metrics:
            data = self._metric(m.name, arms, feedback, probes, shadow_llr, noise)
            stable_n = data[0].total if isinstance(data[0], Counts) else len(data[0])
            candidate_n = data[1].total if isinstance(data[1], Counts) else len(data[1])
            if stable_n or candidate_n:
                out[m.name] = MetricSamples(stable=data[0], candidate=data[1])
        return out

    @staticmethod
    def _metric(
        name: str,
        arms: Mapping[str, list],
        feedback: Mapping[str, list[float]],
        probes: Mapping[str, list[bool]],
        shadow_llr: list[float],
        noise: list[float],
    ) -> tuple[Any, Any]:
        """(stable, candidate) data of one metric."""
        def each(fn: Callable[[list], Any]) -> tuple[Any, Any]:
            return fn(arms["stable"]), fn(arms["candidate"])

        def values(attr: str) -> Callable[[list], np.ndarray]:
            # Shadow samples have no ``tpot``: getattr's default leaves them out.
            return lambda ss: np.array([getattr(s, attr, None) for s in ss
                                        if s.completed and getattr(s, attr, None) is not None], dtype=float)

        if name == "error_rate":
            return each(lambda ss: _proportion([s.error for s in ss]))
        if name == "non_finite":
            return each(lambda ss: _proportion([s.non_finite for s in ss]))
        if name == "latency_e2e":
            return each(values("e2e"))
        if name == "ttft":
            return each(lambda ss: np.array([s.ttft for s in ss if s.ttft is not None], dtype=float))
        if name == "tpot":
            return each(values("tpot"))
        if name == "output_tokens":
            return each(values("output_tokens"))
        if name == "feedback_score":
            return np.array(feedback["stable"], dtype=float), np.array(feedback["candidate"], dtype=float)
        if name == "probe_accuracy":
            return _proportion(probes["stable"]), _proportion(probes["candidate"])
        if name == "shadow_divergence":
            return np.array(noise, dtype=float), np.array(shadow_llr, dtype=float)
        if name.startswith(FINISH_PREFIX) and len(name) > len(FINISH_PREFIX):
            reason = name[len(FINISH_PREFIX):]
            # Shadow samples carry no finish reason: only requests count here.
            return each(lambda ss: _proportion([getattr(s, "finish_reason", None) == reason for s in ss
                                                if isinstance(s, RequestSample)]))
        raise ValueError(f"the metric windows do not record {name!r}")

    def summary(self, task: str, version: str, since: float) -> dict[str, Any]:
        """Counts and typical values of ``task@version`` since ``since``, for people (status pages).

        ``requests`` counts every recorded request, ``in_experiment`` those that are judged,
        ``replicas`` the judged ones per engine replica that answered them (Ray Serve; empty in
        one process).
        """
        with self._lock:
            everything = self._requests_since(task, version, since, experiment_only=False)
            feedback = [f.score for f in _since(self._feedback.get((task, version), deque()), since)]
            probes = [p.correct for p in _since(self._probes.get((task, version), deque()), since)]
        judged = [s for s in everything if s.in_experiment]
        completed = [s for s in judged if s.completed]
        finish: dict[str, int] = {}
        replicas: dict[str, int] = {}
        for s in judged:
            if s.finish_reason is not None:
                finish[s.finish_reason] = finish.get(s.finish_reason, 0) + 1
            if s.replica:
                replicas[s.replica] = replicas.get(s.replica, 0) + 1
        return {
            "requests": len(everything),
            "in_experiment": len(judged),
            "errors": sum(s.error for s in judged),
            "non_finite": sum(s.non_finite for s in judged),
            "error_rate": sum(s.error for s in judged) / len(judged) if judged else None,
            "median_latency_e2e": _median([s.e2e for s in completed if s.e2e is not None]),
            "median_ttft": _median([s.ttft for s in judged if s.ttft is not None]),
            "median_tpot": _median([s.tpot for s in completed if s.tpot is not None]),
            "mean_output_tokens": _mean([s.output_tokens for s in completed if s.output_tokens is not None]),
            "finish_reasons": finish,
            "replicas": replicas,
            "feedback": len(feedback),
            "mean_feedback_score": _mean(feedback),
            "probes": len(probes),
            "probe_accuracy": sum(probes) / len(probes) if probes else None,
        }

    def shadow_summary(self, task: str, since: float, candidate: str | None = None) -> dict[str, Any]:
        """Shadow copies of ``task`` since ``since`` (of ``candidate``, else the latest one shadowed).

        ``divergence`` is the mean LLR of the candidate minus that of the noise floor (stable
        against itself): about 0 when the candidate differs from stable no more than stable
        differs from itself. None where a series has no data.
        """
        with self._lock:
            if candidate is None:
                latest = [(series[-1].at, cand) for (t, cand), series in self._shadow.items() if t == task and series]
                candidate = max(latest)[1] if latest else None
            shadow = _since(self._shadow.get((task, candidate), deque()), since) if candidate else []
            noise = self._noise_since(task, since)
        llrs = [s.llr for s in shadow if s.llr is not None]
        mean_llr, noise_llr = _mean(llrs), _mean(noise)
        return {
            "task": task,
            "candidate": candidate,
            "n": len(shadow),
            "errors": sum(s.error for s in shadow),
            "agreement_rate": sum(s.exact_match for s in shadow) / len(shadow) if shadow else None,
            "mean_llr": mean_llr,
            "noise_floor_n": len(noise),
            "noise_floor_mean_llr": noise_llr,
            "divergence": mean_llr - noise_llr if mean_llr is not None and noise_llr is not None else None,
            "median_latency_e2e": _median([s.e2e for s in shadow if s.completed and s.e2e is not None]),
            "mean_output_tokens": _mean([s.output_tokens for s in shadow if s.completed and s.output_tokens is not None]),
        }

    # ---- memory -------------------------------------------------------------------------

    def prune(self, cutoffs: Mapping[str, float], default: float) -> None:
        """Drop samples of each task older than ``cutoffs[task]`` (others: older than ``default``).

        The controller passes each active rollout's step start, the oldest sample it can still
        judge, and ``now`` minus a short retention for tasks without a rollout. Empty series
        are removed. Completions awaiting feedback are kept by their own TTL.
        """
        with self._lock:
            for table in (self._requests, self._feedback, self._probes, self._shadow, self._noise):
                for key in list(table):
                    task = key if isinstance(key, str) else key[0]
                    series = table[key]
                    _prune(series, cutoffs.get(task, default))
                    if not series:
                        del table[key]
            self._expire(self._clock())
