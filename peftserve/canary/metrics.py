"""Metric windows: the evidence each (task, version) has gathered, in the form the judge reads.

The server records every answered request as a :class:`~peftserve.canary.samples.RequestRecord`
(:meth:`MetricWindows.record`), the feedback users send on a completion
(:meth:`~MetricWindows.register_completion` when it answers, then
:meth:`~MetricWindows.record_feedback`), and its shadow copies; the controller records its
probes (:meth:`~MetricWindows.record_probe`). Recording only appends to a list under a lock;
the records are folded into running sums when the controller next reads
(:meth:`~MetricWindows.evidence`), so the request path never waits for arithmetic. A bulk,
columnar path (:meth:`~MetricWindows.record_columns`) feeds the same sums for pushes from other
processes and for the simulator in ``bench/canary_sim.py``.

What is kept is what the judge needs, not the requests:

* per (task, version), a table of sums per cell ``(stratum, segment, unit)``: requests, errors,
  non-finite outputs, finish reasons, latency sums, output tokens, feedback sums. The *unit* is
  the routed user or session (so the judge's variance is clustered by it), the *stratum* the
  allocation a request was routed under (the weight of the step, ``shadow`` or ``probe``: the
  judge compares the arms within strata, so traffic that drifts while the weight changes
  cannot pose as a difference) and the *segment* a label (``length=...``, ``header:...``,
  ``meta:...``; the empty segment is everything). Memory grows with units, not requests;
* per (task, version), per eval-set prompt: the probe answers (count and sum of scores) and the
  probes' engine time per step (count and sum of logs), which the judge pairs prompt by prompt;
* shadow copies and the noise floor as bounded series (their LLRs are judged as they come).

The controller calls :meth:`~MetricWindows.forget` when a task's rollout starts and ends: a
rollout's evidence is everything recorded during it. Only ``in_experiment`` records (the routing
hash placed them, or probes and shadow copies) enter the judged sums; the others are counted for
people (:meth:`~MetricWindows.summary`).

Metrics the judge can read (:data:`METRICS`; a spec naming another is refused when the rollout
starts, see :func:`check_metrics`):

================== =========== ==============================================================
name               kind        compared as
================== =========== ==============================================================
error_rate         proportion  share of requests that failed (exception or non-finite logits)
non_finite         proportion  share of requests with non-finite logits (also errors)
finish_<reason>    proportion  share finishing with stop, length, abort or error
latency            continuous  probes' engine time per step, candidate vs a twin of stable
latency_e2e        continuous  mean seconds from arrival to last token (raw: batch-confounded)
ttft               continuous  mean seconds to the first token (raw)
tpot               continuous  mean seconds per output token after the first (raw)
output_tokens      continuous  mean tokens generated per completed request
feedback_score     continuous  mean user score in [0, 1] (binary or graded)
probe_accuracy     proportion  eval-set exact match, paired prompt by prompt
shadow_divergence  continuous  mean LLR of shadow copies against the stable noise floor
================== =========== ==============================================================
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftserve.canary.samples import PROBE_STRATUM, ProbeRecord, RequestRecord
from peftserve.canary.sequential import Arm
from peftserve.canary.spec import MetricSpec, RolloutSpecError

METRICS: dict[str, str] = {
    "error_rate": "proportion",
    "non_finite": "proportion",
    "latency": "continuous",
    "latency_e2e": "continuous",
    "ttft": "continuous",
    "tpot": "continuous",
    "output_tokens": "continuous",
    "feedback_score": "continuous",
    "probe_accuracy": "proportion",
    "shadow_divergence": "continuous",
}
"""Metric name -> kind, for the names the judge reads (plus ``finish_<reason>``)."""

FINISH_PREFIX = "finish_"
FINISH_REASONS = ("stop", "length", "abort", "error")
ABORTED = "abort"

COLUMNS = (
    "requests", "errors", "non_finite", "completed", "e2e_n", "e2e", "ttft_n", "ttft", "tpot_n", "tpot",
    "output_tokens", "feedback_n", "feedback", "feedback_graded",
    *(f"finish_{r}" for r in FINISH_REASONS),
)  # fmt: skip
"""Sums kept per cell. Latency and length sums are over completed requests (``e2e_n`` of them)."""
COL = {name: i for i, name in enumerate(COLUMNS)}

MEAN_METRICS: dict[str, tuple[str, str]] = {
    "error_rate": ("errors", "requests"),
    "non_finite": ("non_finite", "requests"),
    "latency_e2e": ("e2e", "e2e_n"),
    "ttft": ("ttft", "ttft_n"),
    "tpot": ("tpot", "tpot_n"),
    "output_tokens": ("output_tokens", "e2e_n"),
    "feedback_score": ("feedback", "feedback_n"),
    **{f"finish_{r}": (f"finish_{r}", "requests") for r in FINISH_REASONS},
}
"""Metrics that are a ratio of two sums per cell: (numerator column, denominator column)."""
EVENT_METRICS = frozenset({"error_rate", "non_finite", *(f"finish_{r}" for r in FINISH_REASONS)})
"""Rates of events, judged with the exact rate-ratio e-process when their margin is a ratio."""

MAX_STRATA = 127
MAX_SEGMENTS = 4096
"""Distinct segment labels remembered per task; later labels are not tracked as segments."""


def metric_kind(name: str) -> str | None:
    """The kind (``continuous`` or ``proportion``) of a metric the judge reads, else None."""
    if name in METRICS:
        return METRICS[name]
    if name.startswith(FINISH_PREFIX) and name[len(FINISH_PREFIX):] in FINISH_REASONS:
        return "proportion"
    return None


def check_metrics(metrics: Iterable[MetricSpec]) -> None:
    """Refuse (:class:`RolloutSpecError`, 400) metrics the windows cannot produce or of the wrong kind.

    A metric nobody records would stay without data forever and hold the rollout until it pauses.
    """
    for m in metrics:
        kind = metric_kind(m.name)
        if kind is None:
            known = ", ".join([*METRICS, *(f"finish_{r}" for r in FINISH_REASONS)])
            raise RolloutSpecError(f"unknown metric {m.name!r}; the metric windows record: {known}")
        if kind != m.kind:
            raise RolloutSpecError(f"metric {m.name!r} is a {kind} metric, not {m.kind}")
        if m.name == "latency" and not m.relative:
            raise RolloutSpecError("metric 'latency' is judged relative to stable (a ratio of engine times per "
                                   "step); set relative: true and give tolerance and mde as fractions (0.1 = 10 %)")


# --------------------------------------------------------------------------- cell tables


class _Table:
    """Sums per cell ``(stratum, segment, unit)`` of one (task, version); keys pack the three."""

    def __init__(self) -> None:
        self.index: dict[int, int] = {}
        self.keys = np.zeros(64, dtype=np.int64)
        self.stats = np.zeros((64, len(COLUMNS)))
        self.n = 0

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add ``values`` [m, C] to the cells ``keys`` [m] (unique)."""
        rows = np.empty(keys.size, dtype=np.int64)
        for i, k in enumerate(keys.tolist()):
            row = self.index.get(k)
            if row is None:
                row = self.index[k] = self.n
                self.n += 1
                if self.n > self.keys.size:
                    self.keys = np.concatenate([self.keys, np.zeros_like(self.keys)])
                    self.stats = np.concatenate([self.stats, np.zeros_like(self.stats)])
                self.keys[row] = k
            rows[i] = row
        np.add.at(self.stats, rows, values)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        return self.keys[: self.n].copy(), self.stats[: self.n].copy()


def _pack(stratum: np.ndarray, segment: np.ndarray, unit: np.ndarray) -> np.ndarray:
    return (stratum.astype(np.int64) << 56) | (segment.astype(np.int64) << 40) | unit.astype(np.int64)


def _unpack(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return keys >> 56, (keys >> 40) & 0xFFFF, keys & ((1 << 40) - 1)


@dataclass
class _Task:
    """Everything one task has recorded during its current rollout."""

    strata: dict[str, int] = field(default_factory=dict)
    segments: dict[str, int] = field(default_factory=lambda: {"": 0})
    tables: dict[str, _Table] = field(default_factory=dict)
    shown: dict[str, np.ndarray] = field(default_factory=dict)
    """Per version: sums of every request, judged or not (for people)."""
    probes: dict[str, np.ndarray] = field(default_factory=dict)
    """version -> [prompts, 4]: answers, sum of scores, timed probes, sum of log step time."""
    replicas: dict[str, dict[str, int]] = field(default_factory=dict)
    """version -> engine replica -> judged user requests it answered (Ray Serve; empty in one process)."""
    first_at: float | None = None
    last_at: float | None = None

    def stratum(self, name: str) -> int:
        code = self.strata.get(name)
        if code is None:
            if len(self.strata) >= MAX_STRATA:
                raise ValueError(f"more than {MAX_STRATA} allocation strata in one rollout")
            code = self.strata[name] = len(self.strata)
        return code

    def segment(self, label: str) -> int | None:
        code = self.segments.get(label)
        if code is None and len(self.segments) < MAX_SEGMENTS:
            code = self.segments[label] = len(self.segments)
        return code


# --------------------------------------------------------------------------- columnar batches


@dataclass
class Columns:
    """Requests of one (task, version, arm, stratum) as columns: the bulk form of records.

    ``unit`` [n] int64 unit codes (:func:`~peftserve.canary.samples.unit_id`); ``values`` [n, C]
    per :data:`COLUMNS`; ``labels``: segment labels per request (a list of n tuples, or arrays of
    n label strings, "" for none); ``at`` [n] their times; ``in_experiment`` [n] bool.
    """

    task: str
    version: str
    arm: str
    stratum: str
    unit: np.ndarray
    values: np.ndarray
    in_experiment: np.ndarray
    at: np.ndarray
    labels: Sequence[Any] = ()


def _record_values(r: RequestRecord) -> list[float]:
    v = [0.0] * len(COLUMNS)
    v[COL["requests"]] = 1.0
    v[COL["errors"]] = float(r.error)
    v[COL["non_finite"]] = float(r.non_finite)
    if r.completed:
        v[COL["completed"]] = 1.0
        if r.e2e is not None:
            v[COL["e2e_n"]], v[COL["e2e"]] = 1.0, float(r.e2e)
            if r.output_tokens is not None:
                v[COL["output_tokens"]] = float(r.output_tokens)
        if r.tpot is not None:
            v[COL["tpot_n"]], v[COL["tpot"]] = 1.0, float(r.tpot)
    if r.ttft is not None:
        v[COL["ttft_n"]], v[COL["ttft"]] = 1.0, float(r.ttft)
    if r.finish_reason in FINISH_REASONS:
        v[COL[f"finish_{r.finish_reason}"]] = 1.0
    elif r.error:
        v[COL["finish_error"]] = 1.0
    return v


def columns_of(records: Sequence[RequestRecord]) -> list[Columns]:
    """Group records by (task, version, arm, stratum) into :class:`Columns`."""
    groups: dict[tuple[str, str, str, str], list[RequestRecord]] = {}
    for r in records:
        groups.setdefault((r.task, r.version, r.arm, r.stratum), []).append(r)
    out = []
    for (task, version, arm, stratum), rs in groups.items():
        out.append(Columns(
            task, version, arm, stratum,
            unit=np.array([r.unit for r in rs], dtype=np.int64),
            values=np.array([_record_values(r) for r in rs], dtype=float),
            in_experiment=np.array([r.in_experiment for r in rs], dtype=bool),
            at=np.array([r.at for r in rs], dtype=float),
            labels=[r.segments for r in rs],
        ))  # fmt: skip
    return out


# --------------------------------------------------------------------------- evidence


@dataclass
class Evidence:
    """A snapshot of one rollout's data for the judge: plain arrays, no locks, no clock.

    ``tables[version]`` holds ``(stratum, segment, unit, columns)`` per cell (units as dense codes
    shared by both versions, ``columns`` [C, cells] per :data:`COLUMNS`); ``probes[version]`` a row per prompt index: ``(answers, score sum,
    timed probes, sum of log step time)``; ``strata`` and ``segments`` the code of every stratum
    and segment label.
    """

    stable: str
    candidate: str
    strata: dict[str, int]
    segments: dict[str, int]
    tables: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    probes: dict[str, np.ndarray]
    shadow_llr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    noise_llr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    first_at: float | None = None
    last_at: float | None = None
    _rows: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)
    _arms: dict[tuple[str, str, str, int], Arm] = field(default_factory=dict, repr=False)

    def _segment_rows(self, version: str, segment: int) -> np.ndarray:
        """Row indices of ``version``'s cells in ``segment`` (grouped once per snapshot)."""
        if not self._rows or (version, -1) not in self._rows:
            _, seg, _, _ = self.tables.get(version, EMPTY_TABLE)
            order = np.argsort(seg, kind="stable")
            codes, starts = np.unique(seg[order], return_index=True)
            bounds = [*starts.tolist(), seg.size]
            for i, code in enumerate(codes.tolist()):
                self._rows[(version, code)] = order[bounds[i]:bounds[i + 1]]
            self._rows[(version, -1)] = order
        return self._rows.get((version, segment), np.zeros(0, dtype=np.int64))

    def arm(self, version: str, numerator: str, denominator: str, segment: int = 0) -> Arm:
        """One arm's cells for a ratio metric, in segment ``segment`` (0: all)."""
        key = (version, numerator, denominator, segment)
        cached = self._arms.get(key)
        if cached is None:
            cached = self._arms[key] = self._arm(*key)
        return cached

    def _arm(self, version: str, numerator: str, denominator: str, segment: int) -> Arm:
        stratum, _, unit, cols = self.tables.get(version, EMPTY_TABLE)
        rows = self._segment_rows(version, segment)
        count = cols[COL[denominator]][rows]
        keep = rows[count > 0]
        return Arm(stratum[keep], unit[keep], cols[COL[numerator]][keep], cols[COL[denominator]][keep])

    def total(self, version: str, column: str, segment: int = 0) -> float:
        """Sum of ``column`` over ``version``'s cells of ``segment``."""
        stratum, seg, _, cols = self.tables.get(version, EMPTY_TABLE)
        if segment == 0:
            return float(cols[COL[column]][seg == 0].sum())
        return float(cols[COL[column]][self._segment_rows(version, segment)].sum())

    def paired_probes(self, latency: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per prompt measured on both versions: (prompt indices, stable mean, candidate mean) of
        the score, or with ``latency`` of the log engine time per step."""
        n, total = (2, 3) if latency else (0, 1)
        s = self.probes.get(self.stable, np.zeros((0, 4)))
        c = self.probes.get(self.candidate, np.zeros((0, 4)))
        size = min(s.shape[0], c.shape[0])
        both = np.flatnonzero((s[:size, n] > 0) & (c[:size, n] > 0))
        return both, s[both, total] / s[both, n], c[both, total] / c[both, n]

    def probe_answers(self, version: str, latency: bool = False) -> float:
        table = self.probes.get(version)
        return float(table[:, 2 if latency else 0].sum()) if table is not None else 0.0


EMPTY_TABLE: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] = (
    np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((len(COLUMNS), 0)))


# --------------------------------------------------------------------------- shadow copies


@dataclass(slots=True)
class ShadowSample:
    """The candidate's answer to a copy of a stable request (its LLR against stable's answer)."""

    at: float
    exact_match: bool
    llr: float | None
    e2e: float | None
    error: bool


@dataclass(slots=True)
class _Completion:
    record: RequestRecord
    registered_at: float
    score: float | None = None


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


class MetricWindows:
    """The evidence of every task's current rollout; thread-safe (one lock, held briefly).

    ``clock`` stamps what is recorded without a time (tests pass a fake clock);
    ``feedback_ttl_s`` is how long a completion id accepts feedback, ``max_completions`` how many
    ids are remembered at most (the oldest go first); ``max_series`` bounds the shadow series.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        feedback_ttl_s: float = 3600.0,
        max_completions: int = 200_000,
        max_series: int = 50_000,
    ) -> None:
        if max_series < 1 or max_completions < 1:
            raise ValueError("max_series and max_completions must be at least 1")
        if not feedback_ttl_s > 0:
            raise ValueError(f"feedback_ttl_s must be > 0, not {feedback_ttl_s}")
        self._clock = clock
        self.feedback_ttl_s = feedback_ttl_s
        self._max_completions = max_completions
        self._max_series = max_series
        self._lock = threading.Lock()
        self._pending: list[RequestRecord | Columns | tuple] = []
        self._tasks: dict[str, _Task] = {}
        self._completions: OrderedDict[str, _Completion] = OrderedDict()
        self._shadow: dict[tuple[str, str], deque[ShadowSample]] = {}
        self._noise: dict[str, deque[tuple[float, float]]] = {}
        self._rate: dict[str, deque[list[float]]] = {}

    def _now(self, at: float | None) -> float:
        return self._clock() if at is None else float(at)

    # ---- recording ----------------------------------------------------------------------

    def record(self, record: RequestRecord) -> None:
        """Record one answered (or failed) request; folded into the sums at the next read."""
        with self._lock:
            self._pending.append(record)
            self._count_rate(record.task, record.at)

    def record_many(self, records: Iterable[RequestRecord]) -> None:
        """Record several requests at once (a push from another process)."""
        records = list(records)
        with self._lock:
            self._pending.extend(records)
            for r in records:
                self._count_rate(r.task, r.at)

    def record_columns(self, columns: Columns) -> None:
        """Record requests in columnar form (bulk pushes, the simulator)."""
        with self._lock:
            self._pending.append(columns)
            if columns.unit.size:
                self._count_rate(columns.task, float(columns.at.max()), int(columns.unit.size))

    def _count_rate(self, task: str, at: float, n: int = 1) -> None:
        """Requests per 10 s bucket over the last 5 minutes (the plan's traffic estimate)."""
        buckets = self._rate.setdefault(task, deque(maxlen=31))
        b = math.floor(at / 10.0)
        if buckets and buckets[-1][0] == b:
            buckets[-1][1] += n
        elif not buckets or buckets[-1][0] < b:
            buckets.append([b, float(n)])

    def recent_rate(self, task: str, now: float | None = None) -> float:
        """The task's requests per second over the last five minutes (0 without traffic)."""
        now = self._now(now)
        with self._lock:
            buckets = list(self._rate.get(task, ()))
        lo = math.floor(now / 10.0) - 30
        total = sum(n for b, n in buckets if b >= lo)
        if not total:
            return 0.0
        first = min(b for b, _ in buckets if b >= lo)
        span = max(now - first * 10.0, 10.0)
        return total / min(span, 300.0)

    def register_completion(self, completion_id: str, record: RequestRecord, *, at: float | None = None) -> None:
        """Remember the request that answered ``completion_id``, so feedback on it counts for its
        version, unit, stratum and segments."""
        now = self._now(at)
        with self._lock:
            self._expire(now)
            self._completions[completion_id] = _Completion(record, now)
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
            first = c.score is None
            delta_n = 1.0 if first else 0.0
            delta = value - (c.score or 0.0)
            graded = float(value not in (0.0, 1.0)) - float(c.score is not None and c.score not in (0.0, 1.0))
            c.score = value
            self._pending.append(("feedback", c.record, delta_n, delta, graded))
        return True

    def _expire(self, now: float) -> None:
        cutoff = now - self.feedback_ttl_s
        while self._completions:
            first = next(iter(self._completions.values()))
            if first.registered_at >= cutoff:
                break
            self._completions.popitem(last=False)

    def record_probe(self, probe: ProbeRecord) -> None:
        """Record one eval-set answer (and the probe as a request in stratum ``probe``)."""
        with self._lock:
            self._pending.append(probe)

    def record_shadow(self, task: str, candidate: str, *, exact_match: bool, llr: float | None,
                      e2e: float | None, error: bool, at: float | None = None) -> None:
        """Record the candidate's answer to a shadow copy (its request record goes to :meth:`record`)."""
        sample = ShadowSample(self._now(at), bool(exact_match), _finite(llr), _finite(e2e), bool(error))
        with self._lock:
            self._shadow.setdefault((task, candidate), deque(maxlen=self._max_series)).append(sample)

    def record_noise_floor(self, task: str, llr: float, *, at: float | None = None) -> None:
        """Record the divergence of stable from itself (the baseline of ``shadow_divergence``)."""
        value = _finite(llr)
        if value is None:
            return
        with self._lock:
            self._noise.setdefault(task, deque(maxlen=self._max_series)).append((self._now(at), value))

    # ---- folding ------------------------------------------------------------------------

    def _fold(self) -> None:
        """Fold pending records into the sums (called under the lock)."""
        pending, self._pending = self._pending, []
        records: list[RequestRecord] = []
        for item in pending:
            if isinstance(item, RequestRecord):
                records.append(item)
            elif isinstance(item, ProbeRecord):
                self._fold_probe(item)
                if item.request is not None:
                    records.append(item.request)
            elif isinstance(item, Columns):
                self._fold_columns(item)
            else:
                _, record, delta_n, delta, graded = item
                self._fold_feedback(record, delta_n, delta, graded)
        for r in records:
            if r.replica and r.in_experiment and r.stratum != PROBE_STRATUM:
                served = self._tasks.setdefault(r.task, _Task()).replicas.setdefault(r.version, {})
                served[r.replica] = served.get(r.replica, 0) + 1
        for columns in columns_of(records):
            self._fold_columns(columns)

    def _fold_probe(self, p: ProbeRecord) -> None:
        t = self._tasks.setdefault(p.task, _Task())
        table = t.probes.get(p.version)
        if table is None or table.shape[0] <= p.prompt:
            grown = np.zeros((max(64, 2 * p.prompt + 2, table.shape[0] * 2 if table is not None else 0), 4))
            if table is not None:
                grown[: table.shape[0]] = table
            table = t.probes[p.version] = grown
        cell = table[p.prompt]
        if p.score is not None:
            cell[0] += 1.0
            cell[1] += float(p.score)
        step_time = p.step_time
        if step_time is not None:
            cell[2] += 1.0
            cell[3] += math.log(step_time)

    def _fold_feedback(self, r: RequestRecord, delta_n: float, delta: float, graded: float) -> None:
        if not r.in_experiment:
            return
        t = self._tasks.setdefault(r.task, _Task())
        values = np.zeros((1, len(COLUMNS)))
        values[0, COL["feedback_n"]] = delta_n
        values[0, COL["feedback"]] = delta
        values[0, COL["feedback_graded"]] = graded
        codes = [0, *(c for c in (t.segment(label) for label in r.segments) if c is not None)]
        keys = _pack(np.full(len(codes), t.stratum(r.stratum)), np.array(codes), np.full(len(codes), r.unit))
        t.tables.setdefault(r.version, _Table()).add(keys, np.repeat(values, len(codes), axis=0))

    def _fold_columns(self, c: Columns) -> None:
        n = c.unit.size
        if n == 0:
            return
        t = self._tasks.setdefault(c.task, _Task())
        if c.stratum != PROBE_STRATUM:  # probes are no user traffic
            shown = t.shown.setdefault(c.version, np.zeros(len(COLUMNS)))
            shown += c.values.sum(axis=0)
        at_max = float(c.at.max())
        t.first_at = min(t.first_at, float(c.at.min())) if t.first_at is not None else float(c.at.min())
        t.last_at = max(t.last_at, at_max) if t.last_at is not None else at_max
        judged = c.in_experiment
        if not judged.any():
            return
        unit, values = c.unit[judged], c.values[judged]
        stratum = t.stratum(c.stratum)
        seg_rows = [np.arange(unit.size)]
        seg_codes = [np.zeros(unit.size, dtype=np.int64)]
        for rows, codes in self._segment_codes(t, c.labels, judged):
            seg_rows.append(rows)
            seg_codes.append(codes)
        rows = np.concatenate(seg_rows)
        keys = _pack(np.full(rows.size, stratum), np.concatenate(seg_codes), unit[rows])
        uniq, inverse = np.unique(keys, return_inverse=True)
        sums = np.zeros((uniq.size, len(COLUMNS)))
        np.add.at(sums, inverse, values[rows])
        t.tables.setdefault(c.version, _Table()).add(uniq, sums)

    @staticmethod
    def _segment_codes(t: _Task, labels: Sequence[Any], judged: np.ndarray) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """(row indices among the judged rows, segment codes) per label position."""
        if not len(labels):
            return
        index = np.flatnonzero(judged)
        if isinstance(labels[0], np.ndarray):  # one array of n labels per dimension
            for column in labels:
                values = np.asarray(column)[index]
                uniq, inverse = np.unique(values, return_inverse=True)
                codes = np.array([t.segment(str(u)) if u else None for u in uniq], dtype=object)
                ok = np.array([code is not None for code in codes])[inverse]
                yield np.flatnonzero(ok), np.array([codes[i] for i in inverse[ok]], dtype=np.int64)
            return
        rows, codes = [], []
        for j, i in enumerate(index.tolist()):
            for label in labels[i]:
                code = t.segment(label)
                if code is not None:
                    rows.append(j)
                    codes.append(code)
        if rows:
            yield np.array(rows, dtype=np.int64), np.array(codes, dtype=np.int64)

    # ---- reading ------------------------------------------------------------------------

    def fold(self) -> None:
        """Fold what was recorded into the sums now (the controller calls it every round, so
        records of tasks without a reader do not pile up)."""
        with self._lock:
            self._fold()

    def evidence(self, task: str, stable: str, candidate: str) -> Evidence:
        """A snapshot of everything ``task`` recorded since :meth:`forget`, for the judge."""
        with self._lock:
            self._fold()
            t = self._tasks.get(task) or _Task()
            snaps = {v: t.tables[v].snapshot() for v in (stable, candidate) if v in t.tables}
            tables = {}
            if snaps:  # dense unit codes over both arms: the judge's clusters are bincounts
                units = np.concatenate([keys & ((1 << 40) - 1) for keys, _ in snaps.values()])
                _, dense = np.unique(units, return_inverse=True)
                at = 0
                for version, (keys, stats) in snaps.items():
                    stratum, segment, _ = _unpack(keys)
                    tables[version] = (stratum, segment, dense[at:at + keys.size].astype(np.int64),
                                       np.ascontiguousarray(stats.T))
                    at += keys.size
            probes = {v: t.probes[v].copy() for v in (stable, candidate) if v in t.probes}
            shadow = [s.llr for s in self._shadow.get((task, candidate), ()) if s.llr is not None
                      and (t.first_at is None or s.at >= t.first_at)]
            noise = [v for at, v in self._noise.get(task, ()) if t.first_at is None or at >= t.first_at]
            return Evidence(stable, candidate, dict(t.strata), dict(t.segments), tables, probes,
                            np.array(shadow, dtype=float), np.array(noise, dtype=float), t.first_at, t.last_at)

    def summary(self, task: str, version: str) -> dict[str, Any]:
        """Counts and means of ``task@version``'s user traffic during the current rollout, for
        people (probes are counted apart).

        ``requests`` counts every recorded request, ``in_experiment`` the judged ones; latency
        means are over completed requests; ``replicas`` the judged ones per engine replica that
        answered them (Ray Serve; empty in one process).
        """
        with self._lock:
            self._fold()
            t = self._tasks.get(task) or _Task()
            shown = t.shown.get(version, np.zeros(len(COLUMNS)))
            table = t.tables.get(version)
            stats = table.snapshot()[1] if table is not None else np.zeros((0, len(COLUMNS)))
            keys = table.snapshot()[0] if table is not None else np.zeros(0, np.int64)
            probes = t.probes.get(version, np.zeros((0, 4))).copy()
            replicas = dict(t.replicas.get(version, {}))
        probe = t.strata.get(PROBE_STRATUM, -1)
        users = ((keys >> 40) & 0xFFFF == 0) & ((keys >> 56) != probe)  # all segments' sums, no probes
        judged = stats[users].sum(axis=0) if stats.size else np.zeros(len(COLUMNS))

        def ratio(num: str, den: str) -> float | None:
            d = judged[COL[den]]
            return float(judged[COL[num]] / d) if d else None

        answers = float(probes[:, 0].sum())
        return {
            "requests": int(shown[COL["requests"]]),
            "in_experiment": int(judged[COL["requests"]]),
            "errors": int(judged[COL["errors"]]),
            "non_finite": int(judged[COL["non_finite"]]),
            "error_rate": ratio("errors", "requests"),
            "mean_latency_e2e": ratio("e2e", "e2e_n"),
            "mean_ttft": ratio("ttft", "ttft_n"),
            "mean_output_tokens": ratio("output_tokens", "e2e_n"),
            "feedback": int(judged[COL["feedback_n"]]),
            "mean_feedback_score": ratio("feedback", "feedback_n"),
            "probes": int(answers),
            "probe_prompts": int(np.count_nonzero(probes[:, 0])),
            "probe_accuracy": float(probes[:, 1].sum()) / answers if answers else None,
            "replicas": replicas,
        }

    def shadow_summary(self, task: str, candidate: str) -> dict[str, Any]:
        """Shadow copies of ``task`` on ``candidate`` during the current rollout.

        ``divergence`` is the mean LLR of the candidate minus that of the noise floor (stable
        against itself): about 0 when the candidate differs from stable no more than stable
        differs from itself. None where a series has no data.
        """
        with self._lock:
            first = self._tasks[task].first_at if task in self._tasks else None
            shadow = [s for s in self._shadow.get((task, candidate), ()) if first is None or s.at >= first]
            noise = [v for at, v in self._noise.get(task, ()) if first is None or at >= first]
        llrs = [s.llr for s in shadow if s.llr is not None]
        mean_llr = float(np.mean(llrs)) if llrs else None
        noise_llr = float(np.mean(noise)) if noise else None
        e2e = [s.e2e for s in shadow if not s.error and s.e2e is not None]
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
            "median_latency_e2e": float(np.median(e2e)) if e2e else None,
        }

    # ---- memory -------------------------------------------------------------------------

    def forget(self, task: str) -> None:
        """Drop ``task``'s evidence (a rollout starts or ended): the next rollout starts afresh.

        Records still pending are folded first, so none of them counts for the next rollout.
        """
        with self._lock:
            self._fold()
            self._tasks.pop(task, None)
            for key in [k for k in self._shadow if k[0] == task]:
                del self._shadow[key]
            self._noise.pop(task, None)


