"""Rollout and analysis specs: what a canary rollout is, validated and JSON-serializable.

A *rollout* moves one task (adapter name) from its ``stable`` version to a ``candidate``
version in weighted ``steps``; at every step the judge compares the two versions on the
metrics of an :class:`AnalysisSpec`, and :func:`peftserve.canary.judge.decide` turns the
judgments into advance / hold / pause / promote / roll back.

Everything here is pure data: the controller stores ``to_dict()`` in SQLite and the admin
API sends it over HTTP; ``from_dict`` rebuilds and re-validates it. Invalid input raises
:class:`RolloutSpecError` (a ``ValueError``) whose ``reason`` a user can act on and whose
``status`` the API returns (400, or 409 for :class:`RolloutConflictError`). Checks that need
registry knowledge (does the task and version exist, is another rollout active) are done by
the caller with :func:`check_registry`, which raises the same exceptions.

States::

    shadow --advance--> ramping(step 0) --advance--> ... ramping(last) --promote--> promoted
       |                   |                                                 \\
       +--pause/rollback---+--pause--> paused --resume--> (where it was)      rollback --> rolled_back

``step_index`` is -1 in the shadow phase (weight 0, the candidate only sees shadow copies)
and the index into ``steps`` afterwards; a paused rollout keeps its step and its weight, so
pausing changes no user's version (it stops the automatic progression only).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Literal

State = Literal["shadow", "ramping", "paused", "promoted", "rolled_back"]
STATES: tuple[str, ...] = ("shadow", "ramping", "paused", "promoted", "rolled_back")
ACTIVE_STATES = frozenset({"shadow", "ramping", "paused"})
"""States in which the rollout still routes traffic to its candidate (or shadow copies)."""
TERMINAL_STATES = frozenset({"promoted", "rolled_back"})

Action = Literal["advance", "hold", "pause", "resume", "promote", "rollback"]
ACTIONS: tuple[str, ...] = ("advance", "hold", "pause", "resume", "promote", "rollback")

DEFAULT_STEPS: tuple[float, ...] = (1.0, 5.0, 10.0, 25.0, 50.0)
WEIGHT_RESOLUTION = 0.01
"""Weights are percentages in steps of 0.01 (the router has 10,000 buckets)."""


class RolloutSpecError(ValueError):
    """A rollout request that cannot be accepted.

    ``reason`` is the message for the user; ``status`` the HTTP status the admin API answers.
    """

    status = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RolloutConflictError(RolloutSpecError):
    """The request clashes with the current state (a second active rollout, an invalid transition)."""

    status = 409


# --------------------------------------------------------------------------- validation helpers


def _name(what: str, value: Any) -> str:
    """A task or version name: non-empty, no '@' (it separates task and version in ``model``)."""
    if not isinstance(value, str) or not value.strip():
        raise RolloutSpecError(f"{what} must be a non-empty string, not {value!r}")
    if "@" in value or value != value.strip():
        raise RolloutSpecError(f"{what} {value!r} must not contain '@' or surrounding spaces")
    return value


def _number(what: str, value: Any, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (bools refused) within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RolloutSpecError(f"{what} must be a finite number, not {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise RolloutSpecError(f"{what} must be {'>' if lo_open else '>='} {lo:g}, not {value:g}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise RolloutSpecError(f"{what} must be {'<' if hi_open else '<='} {hi:g}, not {value:g}")
    return float(value)


def _integer(what: str, value: Any, *, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RolloutSpecError(f"{what} must be an integer, not {value!r}")
    if value < lo:
        raise RolloutSpecError(f"{what} must be at least {lo}, not {value}")
    return value


def _flag(what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RolloutSpecError(f"{what} must be true or false, not {value!r}")
    return value


def _choice(what: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise RolloutSpecError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _check_keys(what: str, data: Any, cls: type) -> dict[str, Any]:
    """Refuse non-mappings and unknown keys (never silently drop a field the user set)."""
    if not isinstance(data, Mapping):
        raise RolloutSpecError(f"{what} must be a JSON object, not {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RolloutSpecError(f"unknown field(s) in {what}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dict(data)


def _required(what: str, data: Mapping[str, Any], cls: type) -> None:
    """Refuse a JSON object that lacks a field without default (a TypeError otherwise)."""
    missing = [f.name for f in fields(cls)
               if f.default is MISSING and f.default_factory is MISSING and f.name not in data]
    if missing:
        raise RolloutSpecError(f"{what} is missing {', '.join(missing)}")


def _list(what: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise RolloutSpecError(f"{what} must be a list, not {type(value).__name__}")
    return list(value)


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class MetricSpec:
    """One metric the judge compares between candidate and stable.

    Harm is measured in the harmful ``direction`` as candidate minus stable: a difference
    (``relative`` false) or a relative change (``relative``: 0.2 = 20 % more than stable). Two
    numbers frame the decision: ``tolerance`` is the harm accepted (a rollback needs evidence,
    valid however often the controller looks, that the harm exceeds it), ``mde`` the smallest
    harm that must not be promoted (a pass needs evidence that the harm is below it). Between the
    two, either outcome is acceptable; the closer they are, the more data a decision takes.
    """

    name: str
    """Metric name as the metric windows report it (e.g. ``latency``)."""
    kind: Literal["continuous", "proportion"]
    """continuous: means (latencies, scores); proportion: shares of 0/1 outcomes."""
    direction: Literal["increase", "decrease"]
    """The harmful direction: ``increase`` for latency and errors, ``decrease`` for accuracy."""
    tolerance: float
    """Largest harm accepted (>= 0): the non-inferiority margin. 0: any harm, once shown, counts."""
    mde: float | None = None
    """Minimum detectable effect: the smallest harm the rollout must catch before promoting
    (> 0); None: the tolerance (which must then be > 0)."""
    relative: bool = False
    """Read ``tolerance`` and ``mde`` relative to the stable arm (0.2 = 20 % more than stable)."""
    critical: bool = True
    """A failure rolls back at once; a failure of a non-critical metric pauses for a person."""
    required: bool = True
    """Promotion waits until this metric passes. An optional metric (sparse feedback) holds the
    promotion only once it has data (``min_samples`` units per arm), until it passes, and only
    while that pass is within reach before ``max_duration_s`` at the rate its samples come (or
    while it looks worse than halfway to its mde); without data it never holds. Either can roll
    back."""
    baseline: Literal["stable", "none"] = "stable"
    """``stable``: compare with the stable arm; ``none``: hold the candidate's own value to the
    tolerance (a proportion with tolerance 0 then fails at its first event: "zero non-finite
    outputs, whatever stable does")."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise RolloutSpecError(f"metric name must be a non-empty string, not {self.name!r}")
        _choice(f"metric {self.name}: kind", self.kind, ("continuous", "proportion"))
        _choice(f"metric {self.name}: direction", self.direction, ("increase", "decrease"))
        _number(f"metric {self.name}: tolerance", self.tolerance, lo=0.0)
        _flag(f"metric {self.name}: relative", self.relative)
        _flag(f"metric {self.name}: critical", self.critical)
        _flag(f"metric {self.name}: required", self.required)
        _choice(f"metric {self.name}: baseline", self.baseline, ("stable", "none"))
        if self.mde is None:
            if self.tolerance == 0 and self.baseline == "stable":
                raise RolloutSpecError(f"metric {self.name}: with tolerance 0, give an mde (the smallest harm "
                                       "that must be caught, > 0)")
        else:
            _number(f"metric {self.name}: mde", self.mde, lo=0.0, lo_open=True)
        if self.kind == "proportion" and not self.relative:
            for what, v in (("tolerance", self.tolerance), ("mde", self.mde)):
                if v is not None and v > 1:
                    raise RolloutSpecError(f"metric {self.name}: a proportion {what} above 1 can never be exceeded")
        if self.baseline == "none" and self.relative:
            raise RolloutSpecError(f"metric {self.name}: baseline 'none' compares with no stable value, so it "
                                   "cannot be relative")

    @property
    def detectable(self) -> float:
        """The minimum detectable effect in use: ``mde``, else the tolerance."""
        return self.mde if self.mde is not None else self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricSpec:
        d = _check_keys("metric", data, cls)
        _required("metric", d, cls)
        return cls(**d)


def default_metrics() -> tuple[MetricSpec, ...]:
    """The metrics a rollout judges unless its spec says otherwise.

    * ``error_rate`` and ``non_finite``: compared with stable (equal rates are fine), any
      shown increase rolls back (tolerance 0); promotion needs them shown within 2 and 1 points.
    * ``latency``: the probes' engine time per step, the candidate against a twin of stable (so
      both are minority adapters sharing their steps with the same majority: fair to a small
      canary), 10 % tolerated, 25 % must be caught.
    * ``probe_accuracy``: eval-set exact match paired prompt by prompt; any shown drop rolls back,
      5 points must be caught. Needs an eval set (drop it from the analysis otherwise).
    * ``feedback_score``: users' scores; optional (sparse), any shown drop rolls back, 5 points
      must be caught when there is feedback.

    Every metric is critical: with tests valid under continuous looking, a shown harm is the
    candidate's, not noise.
    """
    return (
        MetricSpec("error_rate", "proportion", "increase", 0.0, mde=0.02),
        MetricSpec("non_finite", "proportion", "increase", 0.0, mde=0.01),
        MetricSpec("latency", "continuous", "increase", 0.10, mde=0.25, relative=True),
        MetricSpec("probe_accuracy", "proportion", "decrease", 0.0, mde=0.05),
        MetricSpec("feedback_score", "continuous", "decrease", 0.0, mde=0.05, required=False),
    )


@dataclass(frozen=True)
class AnalysisSpec:
    """How the judge compares candidate with stable.

    Error rates are for the whole rollout, however often the controller looks: ``alpha`` bounds
    the chance of rolling back a candidate within tolerance on every metric and segment, split
    evenly over the tests; ``beta`` bounds, per metric, the chance of promoting a candidate whose
    harm reaches the mde.
    """

    metrics: tuple[MetricSpec, ...] = field(default_factory=default_metrics)
    """Metrics to judge; names unique."""
    alpha: float = 0.005
    """Chance of a false rollback over the whole rollout (all metrics, segments and looks)."""
    beta: float = 0.05
    """Chance, per metric, of promoting a candidate whose harm is at least its mde."""
    min_samples: int = 30
    """Fewest units (users, sessions, prompts) per arm before an approximate (large-sample)
    test may decide; the exact tests for rare events decide on any count."""
    max_segments: int = 32
    """Segments (prompt-length buckets, header values, metadata labels) judged per metric, the
    largest first, each at ``alpha / 2`` split over all segment tests; 0 turns segments off."""

    def __post_init__(self) -> None:
        metrics = tuple(_list("metrics", self.metrics))
        if not metrics:
            raise RolloutSpecError("analysis needs at least one metric")
        if not all(isinstance(m, MetricSpec) for m in metrics):
            raise RolloutSpecError("analysis metrics must be MetricSpec objects")
        names = [m.name for m in metrics]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RolloutSpecError(f"metric names must be unique; repeated: {', '.join(dupes)}")
        object.__setattr__(self, "metrics", metrics)
        _number("alpha", self.alpha, lo=0.0, hi=0.5, lo_open=True, hi_open=True)
        _number("beta", self.beta, lo=0.0, hi=0.5, lo_open=True, hi_open=True)
        _integer("min_samples", self.min_samples, lo=10)
        _integer("max_segments", self.max_segments, lo=0)

    def metric(self, name: str) -> MetricSpec:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)

    def with_overrides(self, tolerances: Mapping[str, float] | None = None,
                       mdes: Mapping[str, float] | None = None) -> AnalysisSpec:
        """This analysis with per-metric tolerances and mdes replaced (unknown names refused)."""
        tolerances, mdes = dict(tolerances or {}), dict(mdes or {})
        known = {m.name for m in self.metrics}
        unknown = sorted((set(tolerances) | set(mdes)) - known)
        if unknown:
            raise RolloutSpecError(f"no metric {', '.join(unknown)} in the analysis (metrics: {', '.join(sorted(known))})")
        metrics = tuple(replace(m, tolerance=tolerances.get(m.name, m.tolerance), mde=mdes.get(m.name, m.mde))
                        for m in self.metrics)
        return replace(self, metrics=metrics)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": [m.to_dict() for m in self.metrics],
            "alpha": self.alpha,
            "beta": self.beta,
            "min_samples": self.min_samples,
            "max_segments": self.max_segments,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnalysisSpec:
        d = _check_keys("analysis", data, cls)
        if "metrics" in d:
            d["metrics"] = tuple(MetricSpec.from_dict(m) for m in _list("metrics", d["metrics"]))
        return cls(**d)


# --------------------------------------------------------------------------- routing and policy


@dataclass(frozen=True)
class TargetingRule:
    """Restricts the canary cohort to requests whose header matches.

    All rules of a rollout must match for a request to be eligible for the candidate (or for
    a shadow copy); other requests stay on stable. Header names are case-insensitive (stored
    lower-case); values are compared exactly, after stripping surrounding spaces.
    """

    header: str
    """Header name, e.g. ``x-tier``."""
    values: tuple[str, ...]
    """Accepted values; ``equals`` takes exactly one."""
    op: Literal["equals", "in"] = "in"
    """``equals`` one value or ``in`` a set of values."""

    def __post_init__(self) -> None:
        if not isinstance(self.header, str) or not self.header.strip() or ":" in self.header:
            raise RolloutSpecError(f"targeting header must be a header name, not {self.header!r}")
        object.__setattr__(self, "header", self.header.strip().lower())
        _choice(f"targeting op for {self.header}", self.op, ("equals", "in"))
        values = tuple(_list(f"targeting values for {self.header}", self.values))
        if not values or not all(isinstance(v, str) for v in values):
            raise RolloutSpecError(f"targeting rule for {self.header} needs one or more string values")
        if self.op == "equals" and len(values) != 1:
            raise RolloutSpecError(f"targeting rule 'equals' for {self.header} takes exactly one value, got {len(values)}")
        object.__setattr__(self, "values", tuple(v.strip() for v in values))

    def matches(self, headers: Mapping[str, str]) -> bool:
        """Whether ``headers`` (names already lower-cased) satisfy the rule."""
        value = headers.get(self.header)
        return value is not None and value.strip() in self.values

    def to_dict(self) -> dict[str, Any]:
        return {"header": self.header, "values": list(self.values), "op": self.op}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetingRule:
        d = _check_keys("targeting rule", data, cls)
        _required("targeting rule", d, cls)
        return cls(**d)


@dataclass(frozen=True)
class DecisionPolicy:
    """When the controller pauses for a person (rollbacks and promotions follow the judge)."""

    nodata_pause_s: float = 1800.0
    """Pause when no new sample has arrived for this long (nothing to decide on)."""
    max_errors_in_row: int = 4
    """Pause after this many evaluator errors in a row (an error is never a failure)."""
    max_duration_s: float = 14400.0
    """A rollout whose plan needs longer is warned about at start; one undecided after this long
    pauses for a person (0: no limit)."""

    def __post_init__(self) -> None:
        _number("nodata_pause_s", self.nodata_pause_s, lo=0.0, lo_open=True)
        _integer("max_errors_in_row", self.max_errors_in_row, lo=1)
        _number("max_duration_s", self.max_duration_s, lo=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionPolicy:
        return cls(**_check_keys("policy", data, cls))


@dataclass(frozen=True)
class RolloutSpec:
    """What a user asks for when starting a rollout (``peftserve rollout start`` / ``POST /admin/rollouts``)."""

    task: str
    """Task (adapter name) whose traffic is split."""
    stable: str
    """Version serving the task today."""
    candidate: str
    """Version being rolled out."""
    steps: tuple[float, ...] = DEFAULT_STEPS
    """Candidate weights in percent, strictly increasing, each in (0, 100); promotion (100 %)
    follows the last. 100 itself is refused: it would leave no stable traffic to compare with."""
    step_interval_s: float = 30.0
    """Least time spent at each step (and in the shadow phase): within it a step advances as
    soon as the evidence suffices (see :func:`peftserve.canary.judge.decide`)."""
    shadow_percent: float = 0.0
    """Share (percent) of the cohort's stable requests also copied to the candidate, whose
    answer is discarded. Above 0 the rollout starts with a shadow phase at weight 0."""
    targeting: tuple[TargetingRule, ...] = ()
    """Rules restricting which requests may reach the candidate (all must match)."""
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)
    """Metrics and thresholds of the judge."""
    policy: DecisionPolicy = field(default_factory=DecisionPolicy)
    """When the controller pauses for a person."""
    probe_temperature: float = 0.0
    """Sampling temperature of the probes. 0 (greedy): each eval-set prompt is answered once per
    version; above 0, the set is cycled and repeated answers are repeated measurements."""

    def __post_init__(self) -> None:
        _name("task", self.task)
        _name("stable version", self.stable)
        _name("candidate version", self.candidate)
        if self.candidate == self.stable:
            raise RolloutSpecError(f"candidate and stable are both {self.stable!r}; a rollout needs two versions")
        steps = tuple(_number(f"step {i + 1}", s, lo=0.0, hi=100.0, lo_open=True, hi_open=True)
                      for i, s in enumerate(_list("steps", self.steps)))
        if not steps:
            raise RolloutSpecError("steps must hold at least one weight")
        for prev, cur in zip(steps, steps[1:], strict=False):
            if cur <= prev:
                raise RolloutSpecError(f"steps must be strictly increasing; {cur:g} follows {prev:g}")
        for s in steps:
            if abs(s / WEIGHT_RESOLUTION - round(s / WEIGHT_RESOLUTION)) > 1e-6:
                raise RolloutSpecError(f"step {s:g} is finer than the router's {WEIGHT_RESOLUTION:g} % resolution")
        object.__setattr__(self, "steps", steps)
        _number("step_interval_s", self.step_interval_s, lo=0.0, lo_open=True)
        _number("shadow_percent", self.shadow_percent, lo=0.0, hi=100.0)
        rules = tuple(_list("targeting", self.targeting))
        if not all(isinstance(r, TargetingRule) for r in rules):
            raise RolloutSpecError("targeting must hold TargetingRule objects")
        object.__setattr__(self, "targeting", rules)
        if not isinstance(self.analysis, AnalysisSpec):
            raise RolloutSpecError("analysis must be an AnalysisSpec")
        if not isinstance(self.policy, DecisionPolicy):
            raise RolloutSpecError("policy must be a DecisionPolicy")
        _number("probe_temperature", self.probe_temperature, lo=0.0, hi=2.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "stable": self.stable,
            "candidate": self.candidate,
            "steps": list(self.steps),
            "step_interval_s": self.step_interval_s,
            "shadow_percent": self.shadow_percent,
            "targeting": [r.to_dict() for r in self.targeting],
            "analysis": self.analysis.to_dict(),
            "policy": self.policy.to_dict(),
            "probe_temperature": self.probe_temperature,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutSpec:
        """Build and validate a spec from its JSON form; omitted fields take their defaults."""
        d = _check_keys("rollout", data, cls)
        _required("rollout", d, cls)
        if "steps" in d:
            d["steps"] = tuple(_list("steps", d["steps"]))
        if "targeting" in d:
            d["targeting"] = tuple(TargetingRule.from_dict(r) for r in _list("targeting", d["targeting"]))
        if "analysis" in d:
            d["analysis"] = AnalysisSpec.from_dict(d["analysis"])
        if "policy" in d:
            d["policy"] = DecisionPolicy.from_dict(d["policy"])
        return cls(**d)


def check_registry(spec: RolloutSpec, versions: Collection[str] | None, active: RolloutSpec | None = None) -> None:
    """Checks that need registry knowledge, for the caller that has it.

    ``versions`` are the task's registered versions (None: the task is unknown); ``active`` the
    task's rollout still in an active state, if any. Raises :class:`RolloutSpecError` (400) for
    an unknown task or version and :class:`RolloutConflictError` (409) for a second rollout.
    """
    if versions is None:
        raise RolloutSpecError(f"unknown task {spec.task!r}")
    for what, version in (("stable", spec.stable), ("candidate", spec.candidate)):
        if version not in versions:
            known = ", ".join(sorted(versions)) or "none"
            raise RolloutSpecError(f"unknown {what} version {version!r} of task {spec.task!r} (known: {known})")
    if active is not None:
        raise RolloutConflictError(
            f"task {spec.task!r} already has an active rollout ({active.stable} -> {active.candidate}); "
            "finish or roll it back first"
        )


# --------------------------------------------------------------------------- rollout state


@dataclass(frozen=True)
class Rollout:
    """A rollout's spec and where it stands; ``apply`` gives the next state (pure)."""

    spec: RolloutSpec
    state: State
    """shadow, ramping, paused, promoted or rolled_back."""
    step_index: int
    """-1 in the shadow phase, else the index into ``spec.steps``."""
    step_started_at: float
    """When the current step (or the shadow phase, or a resume) began, in seconds (epoch)."""
    started_at: float
    """When the rollout began."""
    updated_at: float
    """Time of the last transition."""

    def __post_init__(self) -> None:
        if not isinstance(self.spec, RolloutSpec):
            raise RolloutSpecError("rollout spec must be a RolloutSpec")
        _choice("rollout state", self.state, STATES)
        _integer("step_index", self.step_index, lo=-1)
        if self.step_index >= len(self.spec.steps):
            raise RolloutSpecError(f"step_index {self.step_index} is beyond the {len(self.spec.steps)} steps")
        if self.state == "shadow" and self.step_index != -1:
            raise RolloutSpecError("a rollout in the shadow phase has step_index -1")
        if self.state == "ramping" and self.step_index < 0:
            raise RolloutSpecError("a ramping rollout needs a step_index >= 0")
        for what in ("step_started_at", "started_at", "updated_at"):
            _number(what, getattr(self, what))

    @classmethod
    def start(cls, spec: RolloutSpec, now: float) -> Rollout:
        """A new rollout: in the shadow phase when ``shadow_percent`` > 0, else at the first step."""
        if spec.shadow_percent > 0:
            return cls(spec, "shadow", -1, now, now, now)
        return cls(spec, "ramping", 0, now, now, now)

    @property
    def active(self) -> bool:
        """Whether the rollout still routes (shadow, ramping or paused)."""
        return self.state in ACTIVE_STATES

    @property
    def weight(self) -> float:
        """Candidate share of the cohort's traffic in percent (0 in shadow, 100 once promoted)."""
        if self.state == "promoted":
            return 100.0
        if self.state == "rolled_back" or self.step_index < 0:
            return 0.0
        return self.spec.steps[self.step_index]

    @property
    def is_last_step(self) -> bool:
        return self.step_index == len(self.spec.steps) - 1

    def apply(self, action: Action, now: float) -> Rollout:
        """The rollout after ``action`` at time ``now``.

        advance: shadow -> first step, step i -> i + 1 (the last step is left by ``promote``);
        pause: keeps the step and weight; resume: back to the phase it was paused in, with the
        step's interval restarted; promote / rollback: terminal. An action that does not fit the
        state raises :class:`RolloutConflictError`.
        """
        _choice("action", action, ACTIONS)
        if action == "hold":
            return self
        if self.state in TERMINAL_STATES:
            raise RolloutConflictError(f"rollout of {self.spec.task!r} is already {self.state}; cannot {action}")
        if action == "rollback":
            return replace(self, state="rolled_back", updated_at=now)
        if action == "promote":
            if self.state == "shadow":
                raise RolloutConflictError("cannot promote from the shadow phase; the candidate has served no traffic")
            return replace(self, state="promoted", updated_at=now)
        if action == "pause":
            if self.state == "paused":
                raise RolloutConflictError(f"rollout of {self.spec.task!r} is already paused")
            return replace(self, state="paused", updated_at=now)
        if action == "resume":
            if self.state != "paused":
                raise RolloutConflictError(f"rollout of {self.spec.task!r} is {self.state}, not paused")
            state: State = "shadow" if self.step_index < 0 else "ramping"
            return replace(self, state=state, step_started_at=now, updated_at=now)
        # advance
        if self.state == "paused":
            raise RolloutConflictError(f"rollout of {self.spec.task!r} is paused; resume it first")
        if self.is_last_step:
            raise RolloutConflictError("already at the last step; promote instead of advance")
        return replace(self, state="ramping", step_index=self.step_index + 1, step_started_at=now, updated_at=now)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "state": self.state,
            "step_index": self.step_index,
            "weight": self.weight,
            "step_started_at": self.step_started_at,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rollout:
        """Inverse of ``to_dict``; ``weight`` is derived from the step, and refused if it disagrees."""
        if not isinstance(data, Mapping):
            raise RolloutSpecError("rollout must be a JSON object")
        d = dict(data)
        weight = d.pop("weight", None)
        d = _check_keys("rollout state", d, cls)
        _required("rollout state", d, cls)
        d["spec"] = RolloutSpec.from_dict(d["spec"])
        rollout = cls(**d)
        if weight is not None and weight != rollout.weight:
            raise RolloutSpecError(f"weight {weight!r} does not match step {rollout.step_index} ({rollout.weight:g} %)")
        return rollout
