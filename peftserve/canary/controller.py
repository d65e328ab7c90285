"""Rollout controller: every interval, judge each canary against stable and act on the verdict.

The controller owns the rollouts while the server runs. It knows no engine and no HTTP: the
API layer hands it :class:`ControllerHooks` (registry versions, load and unload an adapter,
persist a task's stable version, run one probe completion) and calls its methods from the
admin routes. One round (:meth:`RolloutController.tick`), for every rollout in the shadow phase
or ramping:

1. probes: up to ``probes_per_tick`` prompts of the rollout's eval set, in an order shuffled
   once per rollout, each sent to both versions (pinned). Greedy probes (the spec's
   ``probe_temperature`` 0) answer each prompt once per version for the whole rollout: a
   repeat would give the same answer, so it would add samples, not evidence. Sampled probes
   cycle through the set; repeated answers are repeated measurements of their prompt. An exact
   match (surrounding whitespace stripped) scores 1 in ``probe_accuracy``, paired by prompt; the
   probe is also a request of its version (errors, engine time) in stratum ``probe``. A probe
   that raises is an evaluator error in the history, never a failure of the candidate;
2. judge: :func:`~peftserve.canary.judge.judge` on the evidence of the whole rollout (see
   Restart), stored with its evidence; an exception in the judge is an evaluator error
   (:meth:`Judgment.error`), never a failure;
3. decide: :func:`~peftserve.canary.judge.decide` on this rollout's judgments, stored with its
   reason in words; advance, pause, promote and roll back change the state, hold changes
   nothing (every hold is still stored: its reason is why the rollout did not move).

Evidence accumulates over the whole rollout; it is stratified by the step a request was routed
under, so the judge compares the arms within each step's allocation. At start the controller
writes a *plan* (:func:`~peftserve.canary.plan.plan_rollout`): how long the rollout should take
at the task's recent traffic for the chosen mdes, with warnings when it cannot finish.

Paused rollouts are neither probed nor judged: a person decides (their traffic still adds to the
evidence, which a resume judges with the rest).

Order of effects, so that a crash or a failing hook never sends users somewhere the store does
not know about: a transition is persisted (new state and the events explaining it, in one
transaction) before the router is updated, except a rollback, which updates the router first
(weight 0 at once: safety before bookkeeping). A promotion first persists the task's stable
pointer (``hooks.set_stable``); if that fails the rollout stays at its last step and the next
round tries again. A crash between the two leaves the pointer at the candidate and the rollout
at its last step: routing follows the rollout (its stable arm is named in its spec) until it is
promoted again after the restart.

Unloads: after a promotion the previous stable version stays loaded ``promote_keep_warm_s``
(600 s) for an instant rollback by hand; after a rollback the candidate stays loaded
``rollback_keep_warm_s`` (60 s), for requests in flight. Both are due times on the controller's
clock, carried out by :meth:`~RolloutController.tick`, and skipped when the version serves again
by then (a new rollout, a retry). They live in memory only: after a restart the engine starts
with no adapter loaded, so there is nothing left to unload.

Restart: :meth:`~RolloutController.restore` re-installs every active rollout from the store in
the router, state and weight unchanged, and re-reads its judgments for ``decide``. The evidence
was in memory and is gone, so it restarts at the restore (and greedy probes are answered
again): for a restored rollout the step interval and the no-data timer count from then (the
stored ``step_started_at`` is left as it was).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from peftserve.canary.judge import DONE, Judgment, decide, judge, step_ready
from peftserve.canary.metrics import MetricWindows, check_metrics
from peftserve.canary.plan import plan_rollout
from peftserve.canary.router import Router
from peftserve.canary.samples import PROBE_STRATUM, ProbeRecord, RequestRecord, unit_id
from peftserve.canary.spec import (
    TERMINAL_STATES,
    Action,
    Rollout,
    RolloutConflictError,
    RolloutSpec,
    RolloutSpecError,
    check_registry,
)
from peftserve.canary.store import Event, RolloutStore

logger = logging.getLogger(__name__)

JUDGED_STATES = frozenset({"shadow", "ramping"})
"""States in which the controller probes, judges and decides."""

ADMIN, CONTROLLER = "admin", "controller"
"""Actors of state changes."""
LATENCY_PROMPTS = ("The", "Hello,", "Once upon a time", "1, 2, 3,", "Question:", "def main():", "Dear", "In")
"""Prompts of latency-only probes for rollouts without an eval set (their answers are not judged)."""


class RolloutNotFoundError(RolloutSpecError):
    """The task has no rollout for the requested action (404)."""

    status = 404


@dataclass(frozen=True)
class ControllerConfig:
    """How often the controller judges, how long versions stay warm, how much it probes."""

    interval_s: float = 10.0
    """Seconds between two rounds of :meth:`RolloutController.run`."""
    promote_keep_warm_s: float = 600.0
    """After a promotion, the previous stable version stays loaded this long (instant rollback)."""
    rollback_keep_warm_s: float = 60.0
    """After a rollback, the candidate stays loaded this long, then is unloaded."""
    probes_per_tick: int = 5
    """Eval-set prompts sent to each version per round (each prompt goes to both versions that
    have not answered it yet)."""
    max_eval_set: int = 100_000
    """Most prompts an eval set may hold."""

    def __post_init__(self) -> None:
        for name in ("interval_s",):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)!r}")
        for name in ("promote_keep_warm_s", "rollback_keep_warm_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)!r}")
        if self.probes_per_tick < 0 or self.max_eval_set < 1:
            raise ValueError("probes_per_tick must be >= 0 and max_eval_set >= 1")


@dataclass
class ControllerHooks:
    """What the controller needs from the server, as async callbacks the API layer provides."""

    versions: Callable[[str], Awaitable[Collection[str] | None]]
    """The task's registered versions, or None for an unknown task."""
    ensure_loaded: Callable[[str, str], Awaitable[None]]
    """Load ``(task, version)`` into the engine if it is not (a rollout's candidate, at start)."""
    unload: Callable[[str, str], Awaitable[None]]
    """Unload ``(task, version)`` from the engine (it may be loaded again on demand)."""
    set_stable: Callable[[str, str], Awaitable[None]]
    """Persist ``version`` as the task's stable version (on promotion)."""
    probe: Callable[[str, str, str, float], Awaitable[str | ProbeAnswer]] | None = None
    """One completion of ``prompt`` by ``(task, version)`` at ``temperature``, pinned; returns its
    text, or a :class:`ProbeAnswer` with the request's outcome too (the ``latency`` metric needs
    its engine step times). The stable version's probes must run in a *twin* slot (a second copy
    of stable's weights), so that both probes are minority adapters in the same traffic.
    None: no probes."""
    ended: Callable[[str, str, str], Awaitable[None]] | None = None
    """Called with ``(task, stable, candidate)`` once a rollout is promoted or rolled back (the
    server drops the probe twins)."""


@dataclass(frozen=True)
class ProbeAnswer:
    """A probe's text and, when the server measured it, its outcome as a request record (task,
    version, unit, stratum, arm and time are filled in by the controller)."""

    text: str
    record: RequestRecord | None = None


@dataclass(frozen=True)
class PendingUnload:
    """A version to unload once the clock reaches ``due_at``."""

    task: str
    version: str
    due_at: float
    reason: str
    rollout_id: int


@dataclass
class _Live:
    """An active rollout as the controller holds it."""

    id: int
    rollout: Rollout
    judgments: list[Judgment]
    eval_set: list[dict[str, Any]] | None
    window_start: float
    """Start of the step's timers: the step start, or the restore time after a restart."""
    plan: dict[str, Any] | None = None
    probe_order: list[int] | None = None
    """Eval-set indices in this rollout's shuffled order."""
    answered: dict[str, set[int]] | None = None
    """Greedy probes: prompts each version has answered."""
    probe_cursor: int = 0
    evidence_start: float = 0.0
    """Since when the evidence has been gathered: the start, or the restore after a restart."""
    latency_cursor: int = 0
    """Latency-only probes sent (they cycle through the prompts)."""


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=timezone.utc).isoformat(timespec="seconds")


def deciding_metric(judgment: Judgment) -> str | None:
    """The metric a judgment turned on: the failed one (critical first), else the slowest
    required metric still undecided, else (a pass) the one closest to its mde."""
    ms = [m for m in judgment.metrics]
    if not ms:
        return None
    failed = [m for m in ms if m.status == "fail"]
    if failed:
        m = max(failed, key=lambda m: (m.critical, (m.lower or 0.0) - m.tolerance))
        return f"{m.name}[{m.segment}]" if m.segment else m.name
    overall = [m for m in ms if not m.segment]
    waiting = [m for m in overall if m.required and m.status not in DONE]
    if waiting:
        return min(waiting, key=lambda m: m.progress if m.progress is not None else -1.0).name
    with_bounds = [m for m in overall if m.upper is not None]
    if with_bounds:
        return max(with_bounds, key=lambda m: m.upper - m.mde).name
    return overall[0].name if overall else None


def _check_eval_set(eval_set: Sequence[Mapping[str, Any]] | None, spec: RolloutSpec,
                    can_probe: bool, limit: int) -> list[dict[str, Any]] | None:
    """Validate an eval set (``[{"prompt": str, "answer": str}, ...]``) against the spec.

    Refuses (400) a spec judging ``probe_accuracy`` without an eval set, whose rollout could
    only hold until it paused, and an eval set on a server that runs no probes.
    """
    judged = any(m.name == "probe_accuracy" for m in spec.analysis.metrics)
    if not can_probe and any(m.name == "latency" for m in spec.analysis.metrics):
        raise RolloutSpecError("the analysis judges latency, which is measured with probes, but this server runs "
                               "no probes: remove latency from analysis.metrics (or run the server with probes)")
    if eval_set is None:
        if judged:
            raise RolloutSpecError(
                "the analysis judges probe_accuracy but the rollout has no eval set: give an eval set "
                "([{\"prompt\": ..., \"answer\": ...}]) or remove probe_accuracy from analysis.metrics"
            )
        return None
    if not can_probe:
        raise RolloutSpecError("this server runs no probes; start the rollout without an eval set")
    if isinstance(eval_set, (str, bytes, Mapping)) or not isinstance(eval_set, Sequence):
        raise RolloutSpecError(f"eval set must be a list of {{\"prompt\", \"answer\"}} objects, not {type(eval_set).__name__}")
    if not eval_set:
        raise RolloutSpecError("eval set is empty; omit it or give at least one prompt")
    if len(eval_set) > limit:
        raise RolloutSpecError(f"eval set holds {len(eval_set)} prompts; at most {limit} are accepted")
    items = []
    for i, item in enumerate(eval_set):
        if not isinstance(item, Mapping) or not isinstance(item.get("prompt"), str) \
                or not isinstance(item.get("answer"), str) or not item["prompt"]:
            raise RolloutSpecError(f"eval set item {i} must be an object with a non-empty string \"prompt\" "
                                   f"and a string \"answer\", not {item!r:.200}")
        items.append(dict(item))
    return items


class RolloutController:
    """Runs the rollouts: judgments, decisions, transitions, probes, unloads, manual controls.

    Construct with the store, the metric windows, the router and the hooks; ``clock`` gives
    the time in epoch seconds (tests pass a fake one). Call :meth:`restore` once at startup,
    after the router knows the tasks and their stable versions, then run :meth:`run` as a
    task (or call :meth:`tick` yourself). Every method that changes a rollout is a coroutine
    and must be awaited on the server's event loop; transitions are serialized by one lock.
    Errors for the API: :class:`RolloutSpecError` (400), :class:`RolloutConflictError` (409),
    :class:`RolloutNotFoundError` (404), each with ``.status`` and ``.reason``.
    """

    def __init__(
        self,
        store: RolloutStore,
        metrics: MetricWindows,
        router: Router,
        hooks: ControllerHooks,
        *,
        config: ControllerConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.router = router
        self.hooks = hooks
        self.config = config or ControllerConfig()
        self._clock = clock
        self._live: dict[str, _Live] = {}
        self._unloads: list[PendingUnload] = []
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._last: dict[str, dict[str, Any]] = {}
        self._judgment_counts: dict[str, dict[str, int]] = {}
        self._decision_counts: dict[str, dict[str, int]] = {}

    # ---- lifecycle ----------------------------------------------------------------------

    async def restore(self) -> list[Rollout]:
        """Re-install the store's active rollouts in the router (state and weight unchanged).

        Re-reads each rollout's judgments (for ``decide``) and eval set, asks the hooks to load
        its candidate (a failure is logged and recorded, not raised: the engine loads adapters
        on demand) and records a ``restored`` event. Returns the restored rollouts.
        """
        async with self._lock:
            now = self._clock()
            restored = []
            for rollout_id, rollout in await asyncio.to_thread(self.store.active):
                spec = rollout.spec
                versions = await self.hooks.versions(spec.task)
                missing = [v for v in (spec.stable, spec.candidate) if not versions or v not in versions]
                if missing:  # not served (deleted, or another registry): routing it would invent a task
                    reason = (f"not restored: task {spec.task!r} does not serve "
                              f"{', '.join(missing)}; the rollout stays {rollout.state} in the store")
                    logger.warning("task %s: %s", spec.task, reason)
                    await asyncio.to_thread(self.store.append_event, rollout_id, "restore_skipped",
                                            {"actor": CONTROLLER, "reason": reason}, now)
                    continue
                judgments = await asyncio.to_thread(self.store.judgments, rollout_id)
                eval_set = await asyncio.to_thread(self.store.eval_set, rollout_id)
                self.metrics.forget(spec.task)
                self._live[spec.task] = self._new_live(rollout_id, rollout, judgments, eval_set,
                                                       max(rollout.step_started_at, now))
                self.router.set_rollout(rollout)
                self._note(rollout)
                reason = (f"restored after a restart: {rollout.state} at {rollout.weight:g} %, "
                          f"{len(judgments)} judgment(s) re-read; the evidence restarts now")
                try:
                    await self.hooks.ensure_loaded(spec.task, spec.candidate)
                except Exception as e:  # the engine loads on demand; record and go on
                    logger.exception("task %s: could not load candidate %s on restore", spec.task, spec.candidate)
                    reason += f"; loading the candidate failed: {type(e).__name__}: {e}"
                await asyncio.to_thread(self.store.append_event, rollout_id, "restored",
                                        {"actor": CONTROLLER, "reason": reason}, now)
                logger.info("task %s: %s", spec.task, reason)
                restored.append(rollout)
            return restored

    async def run(self) -> None:
        """Call :meth:`tick` every ``interval_s`` until :meth:`stop`; a failed round is logged, never fatal."""
        while not self._stop.is_set():
            try:
                await self.tick()
            except Exception:  # the loop must survive any one round
                logger.exception("rollout controller round failed; retrying in %g s", self.config.interval_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.config.interval_s)

    def stop(self) -> None:
        """Make :meth:`run` return after its current round."""
        self._stop.set()

    # ---- starting -----------------------------------------------------------------------

    async def start(self, spec: RolloutSpec, eval_set: Sequence[Mapping[str, Any]] | None = None, *,
                    reason: str | None = None) -> Rollout:
        """Start a rollout of ``spec`` (admin), probing with ``eval_set`` if given.

        Refuses with :class:`RolloutSpecError` (400): an unknown task or version, a metric the
        windows do not record, an invalid eval set or a missing one while the analysis judges
        ``probe_accuracy``; with :class:`RolloutConflictError` (409): a second active rollout of
        the task, or a ``stable`` that is not the task's current stable version. Then loads the
        candidate, persists the rollout with a ``state`` event, and routes by it.
        """
        async with self._lock:
            return await self._start(spec, eval_set, reason=reason, retry_of=None)

    async def _start(self, spec: RolloutSpec, eval_set: Sequence[Mapping[str, Any]] | None, *,
                     reason: str | None, retry_of: int | None) -> Rollout:
        check_metrics(spec.analysis.metrics)
        items = _check_eval_set(eval_set, spec, self.hooks.probe is not None, self.config.max_eval_set)
        versions = await self.hooks.versions(spec.task)
        live = self._live.get(spec.task)
        check_registry(spec, versions, live.rollout.spec if live is not None else None)
        current = self.router.tasks.get(spec.task)
        if current is not None and current != spec.stable:
            raise RolloutConflictError(f"the stable version of task {spec.task!r} is {current!r}, not "
                                       f"{spec.stable!r}; a rollout starts from the version serving today")
        await self.hooks.ensure_loaded(spec.task, spec.candidate)
        # Both versions serve again: a pending unload of either (after a rollback) must not happen.
        self._unloads = [u for u in self._unloads
                         if not (u.task == spec.task and u.version in (spec.stable, spec.candidate))]
        now = self._clock()
        rate = self.metrics.recent_rate(spec.task, now)
        probes = self.hooks.probe is not None and (items or any(m.name == "latency" for m in spec.analysis.metrics))
        probe_rate = self.config.probes_per_tick / self.config.interval_s if probes else 0.0
        plan = plan_rollout(spec, rate, probe_rate, len(items) if items else None, self.config.interval_s)
        self.metrics.forget(spec.task)
        rollout = Rollout.start(spec, now)
        steps = ", ".join(f"{s:g}" for s in spec.steps)
        phase = f"shadow phase ({spec.shadow_percent:g} % of stable requests copied)" if rollout.state == "shadow" \
            else f"{rollout.weight:g} % of traffic"
        words = f"started by admin: {spec.stable} -> {spec.candidate}, steps {steps} %, at {phase}"
        if retry_of is not None:
            words += f"; retry of rollout #{retry_of}"
        if reason:
            words += f": {reason}"
        words += f"; plan: {plan['summary']}"
        event = Event("state", {"from": None, "to": rollout.state, "action": "start", "weight": rollout.weight,
                                "step_index": rollout.step_index, "actor": ADMIN, "reason": words,
                                "plan": plan}, now)
        rollout_id = await asyncio.to_thread(self.store.create, rollout, items, [event], retry_of=retry_of)
        self._live[spec.task] = self._new_live(rollout_id, rollout, [], items, now, plan)
        self.router.set_rollout(rollout)
        self._note(rollout)
        logger.info("task %s: rollout #%d %s", spec.task, rollout_id, words)
        for warning in plan["warnings"]:
            logger.warning("task %s: %s", spec.task, warning)
        return rollout

    @staticmethod
    def _new_live(rollout_id: int, rollout: Rollout, judgments: list[Judgment], items: list[dict[str, Any]] | None,
                  window_start: float, plan: dict[str, Any] | None = None) -> _Live:
        order = None
        if items:
            order = list(range(len(items)))
            random.Random(f"{rollout.spec.task}/{rollout.spec.candidate}/{rollout.started_at}").shuffle(order)
        return _Live(rollout_id, rollout, judgments, items, window_start, plan, order,
                     {rollout.spec.stable: set(), rollout.spec.candidate: set()}, evidence_start=window_start)

    # ---- one round ----------------------------------------------------------------------

    async def tick(self) -> None:
        """One round: due unloads, then probes, a judgment and a decision for every judged rollout."""
        await self._run_unloads(self._clock())
        for task in list(self._live):
            await self._probe(task)
            async with self._lock:
                live = self._live.get(task)
                if live is not None and live.rollout.state in JUDGED_STATES:
                    await self._judge_and_act(live, self._clock())
        self.metrics.fold()

    def _judge(self, live: _Live, now: float) -> Judgment:
        r, spec = live.rollout, live.rollout.spec
        evidence = self.metrics.evidence(spec.task, spec.stable, spec.candidate)
        limit = spec.policy.max_duration_s
        return judge(spec.analysis, evidence, at=now, eval_set_size=len(live.eval_set) if live.eval_set else None,
                     probe_sampled=spec.probe_temperature > 0, elapsed_s=now - live.evidence_start,
                     budget_s=max(0.0, limit - (now - r.started_at)) if limit > 0 else None)

    async def _judge_and_act(self, live: _Live, now: float) -> None:
        r, task = live.rollout, live.rollout.spec.task
        try:
            judgment = await asyncio.to_thread(self._judge, live, now)
        except Exception as e:  # an evaluator error says nothing about the candidate
            logger.exception("task %s: judging failed", task)
            judgment = Judgment.error(f"{type(e).__name__}: {e}", at=now)
        live.judgments.append(judgment)
        # decide() reads the step start for its timers: the window's start after a restore.
        decision = decide(replace(r, step_started_at=live.window_start), live.judgments, now)
        metric = deciding_metric(judgment)
        self._count(self._judgment_counts, task, judgment.result)
        self._count(self._decision_counts, task, decision.action)
        self._last.setdefault(task, {}).update(last_progress=judgment.progress, last_result=judgment.result,
                                               last_judgment_at=now)
        payload = {"action": decision.action, "reason": decision.reason, "actor": CONTROLLER,
                   "result": judgment.result, "progress": judgment.progress, "metric": metric}
        if decision.action != "hold":  # what the move rests on: every metric's test, margin and evidence
            payload["evidence"] = [m.detail for m in judgment.metrics]
        events = [Event("judgment", judgment.to_dict(), now), Event("decision", payload, now)]
        if decision.action == "hold":
            logger.debug("task %s: hold: %s", task, decision.reason)
            await asyncio.to_thread(self.store.append_events, live.id, events)
            return
        try:
            await self._transition(live, decision.action, now, CONTROLLER, decision.reason, events)
        except Exception as e:  # e.g. set_stable failed: stay, record, retry next round
            logger.exception("task %s: %s failed", task, decision.action)
            error = Event("evaluator_error", {"actor": CONTROLLER, "action": decision.action,
                                              "reason": f"{decision.action} failed, the rollout stays "
                                                        f"{live.rollout.state}: {type(e).__name__}: {e}"}, now)
            await asyncio.to_thread(self.store.append_events, live.id, [*events, error])

    async def _transition(self, live: _Live, action: Action, now: float, actor: str, reason: str,
                          events: Sequence[Event] = ()) -> Rollout:
        """Apply ``action``: persist state and events in one transaction, route, schedule unloads."""
        old = live.rollout
        new = old.apply(action, now)  # RolloutConflictError when the action does not fit the state
        spec = new.spec
        payload = {"from": old.state, "to": new.state, "action": action, "weight": new.weight,
                   "previous_weight": old.weight, "step_index": new.step_index, "actor": actor, "reason": reason}
        if new.state in TERMINAL_STATES:  # the evidence goes with the rollout: keep what the arms did
            payload["arms"] = {arm: self.metrics.summary(spec.task, v)
                               for arm, v in (("stable", spec.stable), ("candidate", spec.candidate))}
        state_event = Event("state", payload, now)
        if action == "rollback":
            self.router.set_rollout(new)  # weight 0 before anything else can fail
        if action == "promote":
            await self.hooks.set_stable(spec.task, spec.candidate)
        await asyncio.to_thread(self.store.update, live.id, new, [*events, state_event])
        live.rollout = new
        if new.step_started_at != old.step_started_at:  # advance or resume: the step's timers restart
            live.window_start = new.step_started_at
        self.router.set_rollout(new)
        self._note(new)
        logger.info("task %s: %s -> %s (%g %%) by %s: %s", spec.task, old.state, new.state, new.weight, actor, reason)
        if new.state in TERMINAL_STATES:
            del self._live[spec.task]
            self.metrics.forget(spec.task)
            if self.hooks.ended is not None:
                try:
                    await self.hooks.ended(spec.task, spec.stable, spec.candidate)
                except Exception:  # cleanup only: the rollout has ended either way
                    logger.exception("task %s: the ended hook failed", spec.task)
            if new.state == "promoted":
                self._schedule_unload(live.id, spec.task, spec.stable, now + self.config.promote_keep_warm_s,
                                      f"previous stable {spec.stable} kept warm {self.config.promote_keep_warm_s:g} s "
                                      f"after promoting {spec.candidate}")
            else:
                self._schedule_unload(live.id, spec.task, spec.candidate, now + self.config.rollback_keep_warm_s,
                                      f"candidate {spec.candidate} kept {self.config.rollback_keep_warm_s:g} s "
                                      "after its rollback")
        return new

    # ---- probes -------------------------------------------------------------------------

    async def _probe(self, task: str) -> None:
        """Send this round's probes of ``task``'s rollout and record their answers."""
        live = self._live.get(task)
        if live is None or self.hooks.probe is None or live.rollout.state not in JUDGED_STATES:
            return
        spec = live.rollout.spec
        errors: list[str] = []
        sent = 0
        for index, prompt, scored in self._next_prompts(live):
            for version in self._probe_order(live, index):
                if scored and spec.probe_temperature == 0 and index in live.answered[version]:
                    continue
                sent += 1
                try:
                    answer = await self.hooks.probe(task, version, prompt, spec.probe_temperature)
                except Exception as e:  # an evaluator error, never a failure
                    errors.append(f"{version}: {type(e).__name__}: {e}")
                    continue
                self._record_probe(live, version, index, answer, scored)
        if errors:
            now = self._clock()
            reason = f"{len(errors)} of {sent} probes failed (not counted against either version); first: {errors[0]}"
            logger.warning("task %s: %s", task, reason)
            await asyncio.to_thread(self.store.append_event, live.id, "evaluator_error",
                                    {"actor": CONTROLLER, "reason": reason, "errors": errors[:10]}, now)

    @staticmethod
    def _probe_order(live: _Live, index: int) -> tuple[str, str]:
        """Stable first for even prompts, candidate first for odd ones: drift within a round cancels."""
        spec = live.rollout.spec
        return (spec.stable, spec.candidate) if index % 2 == 0 else (spec.candidate, spec.stable)

    def _latency_pending(self, live: _Live) -> bool:
        """Whether the ``latency`` metric is judged and not decided yet."""
        if not any(m.name == "latency" for m in live.rollout.spec.analysis.metrics):
            return False
        latest = next((j for j in reversed(live.judgments) if j.result != "error"), None)
        if latest is None:
            return True
        return any(m.name == "latency" and not m.segment and m.status not in ("pass", "fail")
                   for m in latest.metrics)

    def _next_prompts(self, live: _Live) -> list[tuple[int, str, bool]]:
        """This round's ``(index, prompt, scored)``: greedy eval sets, prompts not yet answered by
        both versions (once each, scored); sampled ones round-robin (scored); then, while latency
        is undecided, latency-only pairs (not scored; each its own index), on the eval set's
        prompts or, without one, :data:`LATENCY_PROMPTS`."""
        spec, k = live.rollout.spec, self.config.probes_per_tick
        out: list[tuple[int, str, bool]] = []
        if live.eval_set:
            assert live.probe_order is not None and live.answered is not None
            order = live.probe_order
            if spec.probe_temperature > 0:
                out = [(i, live.eval_set[i]["prompt"], True)
                       for i in (order[(live.probe_cursor + j) % len(order)] for j in range(k))]
                live.probe_cursor += k
                return out
            both = live.answered[spec.stable] & live.answered[spec.candidate]
            while live.probe_cursor < len(order) and len(out) < k:
                index = order[live.probe_cursor]
                live.probe_cursor += 1
                if index not in both:
                    out.append((index, live.eval_set[index]["prompt"], True))
            if len(out) < k:  # a failed probe left a prompt half answered: retry it
                taken = {i for i, _, _ in out}
                out += [(i, live.eval_set[i]["prompt"], True) for i in order
                        if i not in both and i not in taken][: k - len(out)]
        if len(out) < k and self._latency_pending(live):
            # Each latency-only pair is its own unit (an index past the eval set's): a prompt's
            # timing repeats no more than the traffic around it does.
            prompts = [item["prompt"] for item in live.eval_set] if live.eval_set else list(LATENCY_PROMPTS)
            base = len(live.eval_set) if live.eval_set else 0
            for _ in range(k - len(out)):
                out.append((base + live.latency_cursor, prompts[live.latency_cursor % len(prompts)], False))
                live.latency_cursor += 1
        return out

    def _record_probe(self, live: _Live, version: str, index: int, answer: str | ProbeAnswer, scored: bool) -> None:
        spec = live.rollout.spec
        text = answer.text if isinstance(answer, ProbeAnswer) else answer
        score = None
        if scored and live.eval_set:
            correct = isinstance(text, str) and text.strip() == live.eval_set[index]["answer"].strip()
            score = 1.0 if correct else 0.0
            live.answered[version].add(index)
        now = self._clock()
        record = None
        if isinstance(answer, ProbeAnswer) and answer.record is not None:
            record = replace(answer.record, task=spec.task, version=version, unit=unit_id(f"probe:{index}"),
                             stratum=PROBE_STRATUM, at=now, in_experiment=True,
                             arm="candidate" if version == spec.candidate else "stable")
        self.metrics.record_probe(ProbeRecord(spec.task, version, index, score, now, record))

    # ---- unloads ------------------------------------------------------------------------

    def _schedule_unload(self, rollout_id: int, task: str, version: str, due_at: float, reason: str) -> None:
        self._unloads = [u for u in self._unloads if not (u.task == task and u.version == version)]
        self._unloads.append(PendingUnload(task, version, due_at, reason, rollout_id))

    def _in_use(self, task: str, version: str) -> bool:
        """Whether ``task@version`` serves traffic: the task's stable version or in its active rollout."""
        live = self._live.get(task)
        return self.router.tasks.get(task) == version or (
            live is not None and version in (live.rollout.spec.stable, live.rollout.spec.candidate)
        )

    async def _run_unloads(self, now: float) -> None:
        due = [u for u in self._unloads if u.due_at <= now]
        if not due:
            return
        self._unloads = [u for u in self._unloads if u.due_at > now]
        for u in due:
            if self._in_use(u.task, u.version):
                reason = f"unload of {u.version} skipped: it serves {u.task} again"
            else:
                try:
                    await self.hooks.unload(u.task, u.version)
                    reason = f"unloaded {u.version}: {u.reason}"
                except Exception as e:  # the adapter manager evicts it later anyway
                    logger.exception("task %s: unloading %s failed", u.task, u.version)
                    reason = f"unloading {u.version} failed: {type(e).__name__}: {e}"
            logger.info("task %s: %s", u.task, reason)
            await asyncio.to_thread(self.store.append_event, u.rollout_id, "unload",
                                    {"actor": CONTROLLER, "version": u.version, "reason": reason}, now)

    @property
    def pending_unloads(self) -> list[PendingUnload]:
        """Unloads waiting for their due time, soonest first."""
        return sorted(self._unloads, key=lambda u: u.due_at)

    # ---- manual controls ----------------------------------------------------------------

    async def _manual(self, task: str, action: Action, words: str, reason: str | None) -> Rollout:
        async with self._lock:
            live = self._live.get(task)
            if live is None:
                raise RolloutNotFoundError(f"task {task!r} has no active rollout")
            if reason:
                words += f": {reason}"
            return await self._transition(live, action, self._clock(), ADMIN, words)

    async def pause(self, task: str, reason: str | None = None) -> Rollout:
        """Stop the automatic progression; the weight stays (no user changes version)."""
        return await self._manual(task, "pause", "paused by admin; the weight stays", reason)

    async def resume(self, task: str, reason: str | None = None) -> Rollout:
        """Resume a paused rollout where it was; the step's interval and window restart."""
        return await self._manual(task, "resume", "resumed by admin; the step's interval and window restart", reason)

    async def promote_now(self, task: str, reason: str | None = None) -> Rollout:
        """Promote the candidate now, whatever the judgments say (not from the shadow phase).

        Raises what ``hooks.set_stable`` raises, the rollout then unchanged.
        """
        return await self._manual(task, "promote", "promoted by admin", reason)

    async def rollback_now(self, task: str, reason: str | None = None) -> Rollout:
        """Roll back now: the candidate's weight drops to 0 at once."""
        return await self._manual(task, "rollback", "rolled back by admin", reason)

    async def retry(self, task: str, reason: str | None = None) -> Rollout:
        """Start the task's rolled-back rollout again, as a new rollout with the same spec and eval set."""
        async with self._lock:
            latest = await asyncio.to_thread(self.store.get, task)
            if latest is None:
                raise RolloutNotFoundError(f"task {task!r} has no rollout to retry")
            rollout_id, rollout = latest
            if rollout.state != "rolled_back":
                raise RolloutConflictError(f"the latest rollout of task {task!r} is {rollout.state}; "
                                           "only a rolled-back rollout can be retried")
            eval_set = await asyncio.to_thread(self.store.eval_set, rollout_id)
            return await self._start(rollout.spec, eval_set, reason=reason, retry_of=rollout_id)

    # ---- reading ------------------------------------------------------------------------

    def _current(self, task: str) -> tuple[int, Rollout, _Live | None]:
        live = self._live.get(task)
        if live is not None:
            return live.id, live.rollout, live
        latest = self.store.get(task)
        if latest is None:
            raise RolloutNotFoundError(f"task {task!r} has never had a rollout")
        return latest[0], latest[1], None

    def status(self, task: str) -> dict[str, Any]:
        """Where the task's latest rollout stands, for a person: the admin API's status body.

        ``summary`` says it in one line; ``next`` what the rollout waits for (per metric its
        samples, the samples its pass is expected to need and the time that takes at the current
        traffic); ``last_judgment`` the result, reason and each metric's test, margin and bounds;
        ``arms`` what each version has recorded; ``plan`` the estimate made at start. Raises
        :class:`RolloutNotFoundError` (404).
        """
        rollout_id, r, live = self._current(task)
        spec = r.spec
        if live is not None and live.judgments:
            judgment: Judgment | None = live.judgments[-1]
        else:
            rows = self.store.history(task, 1, rollout_id=rollout_id, kinds=["judgment"])
            judgment = Judgment.from_dict(rows[0]["payload"]) if rows else None
        decisions = self.store.history(task, 1, rollout_id=rollout_id, kinds=["decision"])
        window = live.window_start if live is not None else r.step_started_at
        if live is not None:
            arms = {arm: self.metrics.summary(task, v) for arm, v in (("stable", spec.stable),
                                                                      ("candidate", spec.candidate))}
        else:
            last_state = self.store.history(task, 1, rollout_id=rollout_id, kinds=["state"])
            arms = last_state[0]["payload"].get("arms") if last_state else None
        step = "shadow phase" if r.step_index < 0 else f"step {r.step_index + 1} of {len(spec.steps)}"
        line = f"{task}: {spec.stable} -> {spec.candidate} {r.state} at {r.weight:g} % ({step})"
        now = self._clock()
        nxt = self._next(live, judgment, now) if live is not None and r.state in JUDGED_STATES else None
        if nxt is not None:
            line += f"; {nxt['summary']}"
        elif judgment is not None:
            line += f"; last judgment {judgment.result}"
        out: dict[str, Any] = {
            "rollout_id": rollout_id,
            "task": task,
            "stable": spec.stable,
            "candidate": spec.candidate,
            "state": r.state,
            "active": r.active,
            "weight": r.weight,
            "step_index": r.step_index,
            "step": step,
            "steps": list(spec.steps),
            "started_at": r.started_at,
            "step_started_at": r.step_started_at,
            "window_started_at": window,
            "updated_at": r.updated_at,
            "summary": line,
            "next": nxt,
            "plan": live.plan if live is not None else None,
            "last_judgment": None,
            "last_decision": None,
            "arms": arms or {"stable": None, "candidate": None},
            "eval_set_size": len(live.eval_set) if live is not None and live.eval_set else 0,
            "pending_unloads": [{"version": u.version, "due_at": u.due_at, "reason": u.reason}
                                for u in self.pending_unloads if u.task == task],
            "spec": spec.to_dict(),
        }
        if judgment is not None:
            out["last_judgment"] = {
                "at": judgment.at, "time": _iso(judgment.at), "result": judgment.result,
                "progress": judgment.progress, "reason": judgment.reason,
                "deciding_metric": deciding_metric(judgment),
                "metrics": [m.to_dict() for m in judgment.metrics],
            }
        if decisions:
            d = decisions[0]
            out["last_decision"] = {"at": d["at"], "time": _iso(d["at"]), "action": d["payload"]["action"],
                                    "reason": d["reason"]}
        if spec.shadow_percent > 0 and live is not None:
            out["shadow"] = self.metrics.shadow_summary(task, spec.candidate)
        return out

    @staticmethod
    def _next(live: _Live, judgment: Judgment | None, now: float) -> dict[str, Any]:
        """What the rollout waits for: the next decision, and per metric samples vs needed."""
        r = live.rollout
        action = "promote" if r.state == "ramping" and r.is_last_step else "advance"
        elapsed_step = now - live.window_start
        dwell_left = max(0.0, r.spec.step_interval_s - elapsed_step)
        if judgment is None or judgment.result == "error":
            return {"action": action, "ready": False, "dwell_left_s": dwell_left, "metrics": [],
                    "summary": f"next: {action}; no judgment yet"}
        span = max(now - live.evidence_start, 1e-9)
        rows = []
        for m in judgment.metrics:
            if m.segment or not m.required:
                continue
            rate = m.samples_candidate / span
            left = None
            if m.status not in DONE and m.needed is not None:
                left = max(0.0, m.needed - m.samples_candidate) / rate if rate > 0 else None
            rows.append({"name": m.name, "status": m.status, "samples": m.samples_candidate, "needed": m.needed,
                         "time_left_s": left, "harm": m.harm, "upper": m.upper, "mde": m.mde,
                         "tolerance": m.tolerance})
        if action == "promote":
            ready = judgment.result == "pass"
            why = "every required metric passed" if ready else judgment.reason
        else:
            ready, why = step_ready(r, judgment)
        waiting = [row for row in rows if row["status"] not in DONE]
        lefts = [row["time_left_s"] for row in waiting if row["time_left_s"] is not None]
        parts = []
        for row in waiting[:3]:
            need = f"~{row['needed']:.0f}" if row["needed"] is not None else "?"
            eta = f", ~{_duration(row['time_left_s'])} left" if row["time_left_s"] is not None else ""
            parts.append(f"{row['name']} {row['samples']:.0f} of {need} samples{eta}")
        text = f"next: {action}"
        if ready and dwell_left > 0:
            text += f" in {dwell_left:.0f} s (least time per step)"
        elif not ready:
            text += " when " + ("; ".join(parts) if parts else why)
        return {"action": action, "ready": ready, "why": why, "dwell_left_s": dwell_left, "metrics": rows,
                "time_left_s": max(lefts) if lefts and len(lefts) == len(waiting) else None, "summary": text}

    def history(self, task: str, limit: int = 100, *, rollout_id: int | None = None,
                kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The task's latest ``limit`` events (all its rollouts or one; all kinds or ``kinds``), oldest first.

        Every round stores a judgment and a decision, so a long rollout's log is mostly holds:
        ``kinds=["state"]`` gives its transitions alone.

        Each event: ``at`` and ``time`` (ISO 8601, UTC), ``kind`` (state, judgment, decision,
        evaluator_error, unload, restored, restore_skipped), ``actor``, ``reason`` in words, ``rollout_id`` and
        the stored ``payload`` (a judgment's full evidence). Judgments and decisions also carry
        ``result``/``progress``/``metric`` (the deciding metric) at the top level. A decision
        other than hold names the deciding metric's test, margin and evidence in its ``reason``
        and every metric's (segments shown included) in ``payload["evidence"]``.
        """
        events = self.store.history(task, limit, rollout_id=rollout_id, kinds=kinds)
        if not events and self.store.get(task) is None:
            raise RolloutNotFoundError(f"task {task!r} has never had a rollout")
        for e in events:
            e["time"] = _iso(e["at"])
            p = e["payload"]
            if e["kind"] == "judgment":
                j = Judgment.from_dict(p)
                e.update(result=j.result, progress=j.progress, metric=deciding_metric(j))
            elif e["kind"] == "decision":
                e.update(action=p.get("action"), result=p.get("result"), progress=p.get("progress"),
                         metric=p.get("metric"))
            elif e["kind"] == "state":
                e.update(state_from=p.get("from"), state_to=p.get("to"), weight=p.get("weight"))
        return events

    # ---- Prometheus ---------------------------------------------------------------------

    def _note(self, rollout: Rollout) -> None:
        spec = rollout.spec
        self._last.setdefault(spec.task, {}).update(
            state=rollout.state, weight=rollout.weight, step_index=rollout.step_index,
            stable=spec.stable, candidate=spec.candidate,
        )

    @staticmethod
    def _count(table: dict[str, dict[str, int]], task: str, key: str) -> None:
        counts = table.setdefault(task, {})
        counts[key] = counts.get(key, 0) + 1

    def metrics_snapshot(self) -> dict[str, Any]:
        """A copy of what a Prometheus collector exports, read at scrape time.

        ``tasks``: per task with a rollout since this process started (or restored), its
        ``state``, ``weight`` (percent), ``step_index``, ``stable``, ``candidate``,
        ``last_progress`` (0-1 toward the next decision, None without data), ``last_result``; ``judgments`` and
        ``decisions``: counters per task and outcome (reset at restart, as counters may be);
        ``active_rollouts`` and ``pending_unloads``: gauges.
        """
        return {
            "tasks": {task: dict(v) for task, v in self._last.items()},
            "judgments": {task: dict(v) for task, v in self._judgment_counts.items()},
            "decisions": {task: dict(v) for task, v in self._decision_counts.items()},
            "active_rollouts": len(self._live),
            "pending_unloads": len(self._unloads),
        }
