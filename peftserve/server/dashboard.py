"""What the web page (``peftserve/ui``) reads: one overview of the server, and rollouts as time series.

``overview`` gathers, for one poll of the page: the engine (device, slots, CPU cache, queue),
every registered adapter version (its registry record, whether it is stable, its tier, and the
requests it served so far by arm and outcome, from the Prometheus counters), and the latest
rollout of every task that had one (``RolloutController.status``).

``rollout_timeline`` turns a rollout's audit history into the series its charts draw:

- ``weight``: the candidate's weight and the state at every state change and every judgment
  (the weight carried forward), so a new point appears after each controller round;
- ``score``: each judgment's progress toward the next decision in percent (a judge that stores
  a ``score`` instead: that score) and result;
- ``metrics``: per metric named in the judgments, every number a judgment record carries for
  it (``series``: one list per key, aligned on ``t``, None where a judgment lacks it) and every
  pair of numbers (``bands``: an interval as ``lo``/``hi`` lists), plus its classification and,
  where the record has a tolerance and a harmful direction, ``margin``: the boundary the
  judge compares the interval with (+tolerance for a harmful increase, -tolerance for a
  harmful decrease). The records are read generically: a judge that stores other fields
  gets them charted under their own names;
- ``events``: the latest events (state changes, judgments, decisions, errors, unloads) and
  every older one but judgments and holds, each with its reason and stored payload, newest
  first;
- ``next_judgment_at`` and ``step_due_at``: when the controller judges next (the last
  judgment plus its interval) and when the current step's interval ends (the earliest time a
  pass can advance or promote), for the page's "next decision" line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from anyio import to_thread

from peftserve.canary.controller import JUDGED_STATES, RolloutNotFoundError
from peftserve.server.metrics import TIERS

if TYPE_CHECKING:
    from peftserve.engine.engine import AsyncLLMEngine
    from peftserve.server.adapters import AdapterService
    from peftserve.server.canary import CanaryRuntime
    from peftserve.server.metrics import Metrics
    from peftserve.server.model_table import ModelTable

TIMELINE_EVENTS = 2000
"""Events read for a timeline by default (each controller round stores a judgment and a decision)."""
RECENT_EVENTS = 60
"""Events listed in a timeline's ``events``."""


def all_rollout_statuses(runtime: CanaryRuntime) -> list[dict[str, Any]]:
    """The latest rollout of every served task that had one (active or finished), by task."""
    tasks = sorted(set(runtime.table.versions) | set(runtime.router.tasks))
    out = []
    for task in tasks:
        try:
            out.append(runtime.controller.status(task))
        except RolloutNotFoundError:
            continue
    return out


def _requests(counts: Mapping[str, Mapping[str, int]] | None) -> dict[str, Any]:
    """``{arm: {outcome: n}}`` -> totals by outcome and by arm."""
    by_outcome: dict[str, int] = {}
    by_arm: dict[str, int] = {}
    for arm, outcomes in (counts or {}).items():
        for outcome, n in outcomes.items():
            by_outcome[outcome] = by_outcome.get(outcome, 0) + n
            by_arm[arm] = by_arm.get(arm, 0) + n
    return {"total": sum(by_arm.values()), "by_outcome": by_outcome, "by_arm": by_arm}


def engine_view(engine: AsyncLLMEngine) -> dict[str, Any]:
    """Device, dtype and the engine's counters and gauges as plain JSON values."""
    llm = getattr(engine, "engine", None)
    device = getattr(getattr(llm, "device", None), "type", None) or "unknown"
    dtype = str(getattr(llm, "dtype", "unknown")).removeprefix("torch.")
    stats = engine.stats
    names = ("gpu_slots_used", "gpu_slots_total", "cpu_cache_used", "cpu_cache_total", "num_running",
             "num_waiting", "kv_blocks_used", "kv_blocks_total", "adapter_loads", "adapter_evictions")  # fmt: skip
    values = {
        n: getattr(stats, n) for n in names if isinstance(getattr(stats, n, None), (int, float))
    }
    return {"device": device, "dtype": dtype, "running": engine.is_running, **values}


async def overview(
    engine: AsyncLLMEngine,
    models: ModelTable,
    metrics: Metrics,
    adapters: AdapterService | None,
    canary: CanaryRuntime | None,
) -> dict[str, Any]:
    """Everything the page's adapter and rollout lists show, in one answer."""
    counts = metrics.request_counts()
    versions = await adapters.list() if adapters is not None else []
    for view in versions:
        view["tier"] = TIERS.get(view.get("status", ""), view.get("status"))
        view["requests"] = _requests(counts.get((view["task"], view["version"])))
    rollouts = await to_thread.run_sync(all_rollout_statuses, canary) if canary is not None else []
    return {
        "object": "overview",
        "time": time.time(),
        "model": models.base_name,
        "base_requests": _requests(counts.get((models.base_name, "base"))),
        "engine": engine_view(engine),
        "canary_interval_s": canary.controller.config.interval_s if canary is not None else None,
        "registry": adapters is not None,
        "adapters": versions,
        "rollouts": rollouts,
    }


# ---- rollout timelines -------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _pair(value: Any) -> tuple[float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        lo, hi = _number(value[0]), _number(value[1])
        if lo is not None and hi is not None:
            return lo, hi
    return None


def _metric_records(payload: Mapping[str, Any]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """(name, record) of each metric in a judgment payload: a list of records with a ``name``,
    or a mapping of name to record."""
    metrics = payload.get("metrics")
    if isinstance(metrics, Mapping):
        yield from ((str(k), v) for k, v in metrics.items() if isinstance(v, Mapping))
    elif isinstance(metrics, list):
        for m in metrics:
            if isinstance(m, Mapping) and isinstance(m.get("name"), str):
                yield m["name"], m


def _margin(record: Mapping[str, Any]) -> float | None:
    tolerance = _number(record.get("tolerance"))
    direction = record.get("direction")
    if tolerance is None or direction not in ("increase", "decrease"):
        return None
    return tolerance if direction == "increase" else -tolerance


class _MetricSeries:
    """One metric's numbers across judgments, aligned on the judgments' times."""

    def __init__(self) -> None:
        self.t: list[float] = []
        self.series: dict[str, list[float | None]] = {}
        self.bands: dict[str, dict[str, list[float | None]]] = {}
        self.classification: list[str | None] = []
        self.direction: str | None = None
        self.critical: bool | None = None

    def add(self, at: float, record: Mapping[str, Any]) -> None:
        i = len(self.t)
        self.t.append(at)
        self.classification.append(record.get("classification") or record.get("status") or record.get("verdict"))
        self.direction = record.get("direction", self.direction)
        self.critical = record.get("critical", self.critical)
        numbers = {k: _number(v) for k, v in record.items() if k != "at"}
        margin = _margin(record)
        if "harm" in record:  # the sequential judge: harm (worse is positive) and its always-valid bounds
            numbers["estimate"] = _number(record.get("harm"))
            margin = _number(record.get("tolerance"))
            record = {**record, "interval": [record.get("lower"), record.get("upper")]}
        if margin is not None:
            numbers["margin"] = margin
        for key, value in numbers.items():
            if value is not None:
                self.series.setdefault(key, [None] * i).append(value)
        for key, value in record.items():
            pair = _pair(value)
            if pair is not None:
                band = self.bands.setdefault(key, {"lo": [None] * i, "hi": [None] * i})
                band["lo"].append(pair[0])
                band["hi"].append(pair[1])
        for values in (*self.series.values(), *(b["lo"] for b in self.bands.values()),
                       *(b["hi"] for b in self.bands.values())):  # fmt: skip
            if len(values) < i + 1:
                values.append(None)

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.t, "series": self.series, "bands": self.bands, "classification": self.classification,
                "direction": self.direction, "critical": self.critical}  # fmt: skip


def build_timeline(status: Mapping[str, Any], events: list[dict[str, Any]], interval_s: float,
                   now: float) -> dict[str, Any]:  # fmt: skip
    """The timeline of one rollout from its status and its events (oldest first)."""
    weight: dict[str, list[Any]] = {"t": [], "weight": [], "state": []}
    score: dict[str, list[Any]] = {"t": [], "score": [], "result": []}
    metrics: dict[str, _MetricSeries] = {}
    current_weight: float | None = None
    current_state: str | None = None
    last_judgment: float | None = None
    for e in events:
        payload = e.get("payload") or {}
        if e["kind"] == "state":
            current_weight = _number(payload.get("weight"))
            current_state = payload.get("to")
        elif e["kind"] == "judgment":
            last_judgment = e["at"]
            score["t"].append(e["at"])
            progress = _number(payload.get("progress"))
            score["score"].append(_number(payload.get("score")) if progress is None else 100.0 * progress)
            score["result"].append(payload.get("result"))
            for name, record in _metric_records(payload):
                metrics.setdefault(name, _MetricSeries()).add(e["at"], record)
        else:
            continue
        if current_weight is not None:
            weight["t"].append(e["at"])
            weight["weight"].append(current_weight)
            weight["state"].append(current_state)
    if status.get("active") and weight["t"]:  # the weight holds until now
        weight["t"].append(now)
        weight["weight"].append(status.get("weight"))
        weight["state"].append(status.get("state"))
    judged = status.get("state") in JUDGED_STATES
    window = status.get("window_started_at") or status.get("step_started_at")
    step_interval = (status.get("spec") or {}).get("step_interval_s")
    return {
        "object": "rollout.timeline",
        "task": status.get("task"),
        "rollout_id": status.get("rollout_id"),
        "time": now,
        "status": dict(status),
        "interval_s": interval_s,
        "next_judgment_at": max((last_judgment or window or now) + interval_s, now)
        if judged
        else None,
        "step_due_at": window + step_interval if judged and window and step_interval else None,
        "weight": weight,
        "score": score,
        "metrics": {name: m.to_dict() for name, m in metrics.items()},
        "events": [_event(e) for e in reversed(_notable(events))],
    }


def _notable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest ``RECENT_EVENTS`` events, and every older one that is not a judgment or a hold
    (state changes, pauses, errors, unloads...), oldest first."""
    recent = events[-RECENT_EVENTS:]
    older = [e for e in events[: -RECENT_EVENTS or None] if e["kind"] != "judgment"
             and not (e["kind"] == "decision" and (e.get("payload") or {}).get("action") == "hold")]  # fmt: skip
    return older + recent


def _event(e: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("id", "at", "time", "kind", "actor", "reason", "result", "score", "metric", "action", "state_from",
            "state_to", "weight", "payload")  # fmt: skip
    return {k: e[k] for k in keep if k in e}


def rollout_timeline(
    runtime: CanaryRuntime, task: str, limit: int = TIMELINE_EVENTS
) -> dict[str, Any]:
    """The task's latest rollout as time series (blocking: reads the store); 404 if it never had one."""
    controller = runtime.controller
    status = controller.status(task)
    rollout_id = status["rollout_id"]
    events = controller.history(task, limit, rollout_id=rollout_id)
    # Every state change, even those older than the latest ``limit`` events: the weight starts there.
    states = controller.history(task, 10_000, rollout_id=rollout_id, kinds=["state"])
    merged = {e["id"]: e for e in (*states, *events)}
    ordered = [merged[i] for i in sorted(merged)]
    return build_timeline(status, ordered, controller.config.interval_s, time.time())
