"""Rollout controller: every interval, judge each canary against stable and act on the verdict.

The controller owns the rollouts while the server runs. It knows no engine and no HTTP: the
API layer hands it :class:`ControllerHooks` (registry versions, load and unload an adapter,
persist a task's stable version, run one probe completion) and calls its methods from the
admin routes. One round (:meth:`RolloutController.tick`), for every rollout in the shadow phase
or ramping:

1. probes: ``probes_per_tick`` prompts of the rollout's eval set, round-robin, each sent to
   both versions (greedy, pinned); an exact match (surrounding whitespace stripped) scores 1
   in ``probe_accuracy``. A probe that raises is an evaluator error in the history, never a
   failure of the candidate;
2. judge: :func:`~peftserve.canary.judge.judge` on the samples since the window began (the
   current step's start; see Restart), stored with its evidence; an exception in the judge is
   an evaluator error (:meth:`Judgment.error`), never a failure;
3. decide: :func:`~peftserve.canary.judge.decide` on all of this rollout's judgments, stored
   with its reason in words; advance, pause, promote and roll back change the state, hold
   changes nothing (every hold is still stored: its reason is why the rollout did not move).

Paused rollouts are neither probed nor judged: a person decides, and judgments made while
paused would count toward ``max_failed`` after a resume.

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
the router, state and weight unchanged, and re-reads its judgments for ``decide``. The metric
samples were in memory and are gone, so the judged window restarts at the restore: for a
restored rollout the step interval and the no-data timer count from then (the stored
``step_started_at`` is left as it was). The probe cursor restarts at the eval set's first prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from peftserve.canary.judge import Judgment, decide, harm_margin, judge
from peftserve.canary.metrics import MetricWindows, check_metrics
from peftserve.canary.router import Router
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
    """Eval-set prompts sent to each version per round (each prompt goes to both)."""
    idle_retention_s: float = 300.0
    """Metric samples of tasks without an active rollout are kept this long (for status pages)."""
    max_eval_set: int = 100_000
    """Most prompts an eval set may hold."""

    def __post_init__(self) -> None:
        for name in ("interval_s",):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)!r}")
        for name in ("promote_keep_warm_s", "rollback_keep_warm_s", "idle_retention_s"):
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
    probe: Callable[[str, str, str], Awaitable[str]] | None = None
    """One greedy completion of ``prompt`` by ``(task, version)``, pinned; None: no probes."""


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
    """Start of the judged window: the step start, or the restore time after a restart."""
    probe_cursor: int = 0


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=timezone.utc).isoformat(timespec="seconds")


def deciding_metric(judgment: Judgment) -> str | None:
    """The metric a judgment turned on, by the judge's own order of rules.

    A failed critical metric, else the failed metric furthest past its tolerance, else the
    inconclusive one furthest past it, else a critical metric without data, else (pass or
    marginal) the metric closest to its tolerance.
    """
    ms = judgment.metrics
    if not ms:
        return None
    for hits in (
        [m for m in ms if m.critical and m.classification == "fail"],
        [m for m in ms if m.classification == "fail"],
        [m for m in ms if m.classification == "inconclusive"],
    ):
        if hits:
            return max(hits, key=harm_margin).name
    missing = [m for m in ms if m.critical and m.classification == "nodata"]
    if missing:
        return missing[0].name
    with_data = [m for m in ms if m.classification != "nodata"]
    if not with_data:
        return min(ms, key=lambda m: min(m.n_stable, m.n_candidate)).name
    return max(with_data, key=harm_margin).name


def _check_eval_set(eval_set: Sequence[Mapping[str, Any]] | None, spec: RolloutSpec,
                    can_probe: bool, limit: int) -> list[dict[str, Any]] | None:
    """Validate an eval set (``[{"prompt": str, "answer": str}, ...]``) against the spec.

    Refuses (400) a spec judging ``probe_accuracy`` without an eval set, whose rollout could
    only hold until it paused, and an eval set on a server that runs no probes.
    """
    judged = any(m.name == "probe_accuracy" for m in spec.analysis.metrics)
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
    if judged and len(items) < spec.analysis.min_samples:
        # Greedy answers repeat with their prompt: round-robin repeats add samples, not evidence.
        logger.warning("task %s: eval set has %d prompts, fewer than min_samples (%d); repeated prompts "
                       "make probe_accuracy look more certain than it is", spec.task, len(items),
                       spec.analysis.min_samples)
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
                self._live[spec.task] = _Live(rollout_id, rollout, judgments, eval_set,
                                              window_start=max(rollout.step_started_at, now))
                self.router.set_rollout(rollout)
                self._note(rollout)
                reason = (f"restored after a restart: {rollout.state} at {rollout.weight:g} %, "
                          f"{len(judgments)} judgment(s) re-read; the judged window restarts now")
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
        rollout = Rollout.start(spec, now)
        steps = ", ".join(f"{s:g}" for s in spec.steps)
        phase = f"shadow phase ({spec.shadow_percent:g} % of stable requests copied)" if rollout.state == "shadow" \
            else f"{rollout.weight:g} % of traffic"
        words = f"started by admin: {spec.stable} -> {spec.candidate}, steps {steps} %, at {phase}"
        if retry_of is not None:
            words += f"; retry of rollout #{retry_of}"
        if reason:
            words += f": {reason}"
        event = Event("state", {"from": None, "to": rollout.state, "action": "start", "weight": rollout.weight,
                                "step_index": rollout.step_index, "actor": ADMIN, "reason": words}, now)
        rollout_id = await asyncio.to_thread(self.store.create, rollout, items, [event], retry_of=retry_of)
        self._live[spec.task] = _Live(rollout_id, rollout, [], items, window_start=now)
        self.router.set_rollout(rollout)
        self._note(rollout)
        logger.info("task %s: rollout #%d %s", spec.task, rollout_id, words)
        return rollout

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
        now = self._clock()
        self.metrics.prune({t: live.window_start for t, live in self._live.items()},
                           default=now - self.config.idle_retention_s)

    def _judge(self, live: _Live, now: float) -> Judgment:
        r = live.rollout
        data = self.metrics.samples(r.spec.task, r.spec.stable, r.spec.candidate, live.window_start,
                                    r.spec.analysis, shadow=r.state == "shadow")
        return judge(r.spec.analysis, data, at=now)

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
        self._last.setdefault(task, {}).update(last_score=judgment.score, last_result=judgment.result,
                                               last_judgment_at=now)
        events = [
            Event("judgment", judgment.to_dict(), now),
            Event("decision", {"action": decision.action, "reason": decision.reason, "actor": CONTROLLER,
                               "result": judgment.result, "score": judgment.score, "metric": metric}, now),
        ]
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
        state_event = Event("state", {"from": old.state, "to": new.state, "action": action, "weight": new.weight,
                                      "previous_weight": old.weight, "step_index": new.step_index,
                                      "actor": actor, "reason": reason}, now)
        if action == "rollback":
            self.router.set_rollout(new)  # weight 0 before anything else can fail
        if action == "promote":
            await self.hooks.set_stable(spec.task, spec.candidate)
        await asyncio.to_thread(self.store.update, live.id, new, [*events, state_event])
        live.rollout = new
        if new.step_started_at != old.step_started_at:  # advance or resume: a new window
            live.window_start = new.step_started_at
        self.router.set_rollout(new)
        self._note(new)
        logger.info("task %s: %s -> %s (%g %%) by %s: %s", spec.task, old.state, new.state, new.weight, actor, reason)
        if new.state in TERMINAL_STATES:
            del self._live[spec.task]
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
        """Send this round's probes of ``task``'s rollout to both versions and record exact matches."""
        live = self._live.get(task)
        if live is None or not live.eval_set or self.hooks.probe is None or live.rollout.state not in JUDGED_STATES:
            return
        spec = live.rollout.spec
        errors: list[str] = []
        sent = 0
        for _ in range(self.config.probes_per_tick):
            item = live.eval_set[live.probe_cursor % len(live.eval_set)]
            live.probe_cursor += 1
            for version in (spec.stable, spec.candidate):
                sent += 1
                try:
                    answer = await self.hooks.probe(task, version, item["prompt"])
                except Exception as e:  # an evaluator error, never a failure
                    errors.append(f"{version}: {type(e).__name__}: {e}")
                    continue
                correct = isinstance(answer, str) and answer.strip() == item["answer"].strip()
                self.metrics.record_probe(task, version, correct)
        if errors:
            now = self._clock()
            reason = f"{len(errors)} of {sent} probes failed (not counted against either version); first: {errors[0]}"
            logger.warning("task %s: %s", task, reason)
            await asyncio.to_thread(self.store.append_event, live.id, "evaluator_error",
                                    {"actor": CONTROLLER, "reason": reason, "errors": errors[:10]}, now)

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

    # ---- request accounting -------------------------------------------------------------

    def record_canary_failure(self, task: str, version: str, *, non_finite: bool = False) -> None:
        """Count a candidate request that failed (and was answered by stable) as a candidate error.

        Call it from the request path (any thread) when the candidate raised or produced
        non-finite logits; record the stable answer that replaced it with
        ``in_experiment=False``, so the request counts once, against the candidate.
        """
        self.metrics.record_request(task, version, in_experiment=True, error=True, non_finite=non_finite)

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

        ``summary`` says it in one line; ``last_judgment`` has the score, result, reason and
        the deciding metric, with each metric's verdict and numbers; ``arms`` the samples each
        version has in the judged window. Raises :class:`RolloutNotFoundError` (404).
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
        step = "shadow phase" if r.step_index < 0 else f"step {r.step_index + 1} of {len(spec.steps)}"
        line = f"{task}: {spec.stable} -> {spec.candidate} {r.state} at {r.weight:g} % ({step})"
        if judgment is not None:
            score = f"score {judgment.score:.1f}" if judgment.score is not None else "no score"
            line += f"; last judgment {judgment.result} ({score})"
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
            "last_judgment": None,
            "last_decision": None,
            "arms": {arm: self.metrics.summary(task, v, window)
                     for arm, v in (("stable", spec.stable), ("candidate", spec.candidate))},
            "eval_set_size": len(live.eval_set) if live is not None and live.eval_set else 0,
            "pending_unloads": [{"version": u.version, "due_at": u.due_at, "reason": u.reason}
                                for u in self.pending_unloads if u.task == task],
            "spec": spec.to_dict(),
        }
        if judgment is not None:
            out["last_judgment"] = {
                "at": judgment.at, "time": _iso(judgment.at), "result": judgment.result, "score": judgment.score,
                "reason": judgment.reason, "deciding_metric": deciding_metric(judgment),
                "metrics": [{"name": m.name, "classification": m.classification, "critical": m.critical,
                             "n_stable": m.n_stable, "n_candidate": m.n_candidate, "stable_value": m.stable_value,
                             "candidate_value": m.candidate_value, "estimate": m.estimate,
                             "interval": list(m.interval) if m.interval else None, "tolerance": m.tolerance,
                             "detail": m.detail} for m in judgment.metrics],
            }
        if decisions:
            d = decisions[0]
            out["last_decision"] = {"at": d["at"], "time": _iso(d["at"]), "action": d["payload"]["action"],
                                    "reason": d["reason"]}
        if spec.shadow_percent > 0:
            out["shadow"] = self.metrics.shadow_summary(task, window, spec.candidate)
        return out

    def history(self, task: str, limit: int = 100, *, rollout_id: int | None = None,
                kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The task's latest ``limit`` events (all its rollouts or one; all kinds or ``kinds``), oldest first.

        Every round stores a judgment and a decision, so a long rollout's log is mostly holds:
        ``kinds=["state"]`` gives its transitions alone.

        Each event: ``at`` and ``time`` (ISO 8601, UTC), ``kind`` (state, judgment, decision,
        evaluator_error, unload, restored, restore_skipped), ``actor``, ``reason`` in words, ``rollout_id`` and
        the stored ``payload`` (a judgment's full evidence). Judgments and decisions also carry
        ``result``/``score``/``metric`` (the deciding metric) at the top level.
        """
        events = self.store.history(task, limit, rollout_id=rollout_id, kinds=kinds)
        if not events and self.store.get(task) is None:
            raise RolloutNotFoundError(f"task {task!r} has never had a rollout")
        for e in events:
            e["time"] = _iso(e["at"])
            p = e["payload"]
            if e["kind"] == "judgment":
                j = Judgment.from_dict(p)
                e.update(result=j.result, score=j.score, metric=deciding_metric(j))
            elif e["kind"] == "decision":
                e.update(action=p.get("action"), result=p.get("result"), score=p.get("score"), metric=p.get("metric"))
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
        ``last_score`` (None before a judgment with data), ``last_result``; ``judgments`` and
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
