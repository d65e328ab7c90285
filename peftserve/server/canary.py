"""Canary rollouts in the server: the controller and its hooks, request accounting, shadow copies.

Two roles (``docs/ray.md``): ``RequestAccounting`` is the ingress's part (accounting, shadow
copies: it records into whatever ``windows`` it is given, the metric windows themselves in one
process, a ``peftserve.server.samples.SampleBuffer`` pushed to the controller on Ray), and
``CanaryRuntime`` adds the controller's part on top (one process runs both):

- **controller**: a ``RolloutController`` on the registry's data directory (``RolloutStore``),
  the metric windows and the model table's router. Its hooks: ``versions`` are the task's
  served versions; ``ensure_loaded``/``unload`` load and unload ``task@version`` through the
  adapter service; ``set_stable`` writes the stable pointer and the model table; ``probe`` is
  one completion on the version's *probe twin* (the same adapter under a second id, so in its
  own slot: probes of both versions are then minority adapters in the same traffic, which makes
  their engine times comparable), never recorded as user traffic; ``ended`` drops the twins.
  ``start`` (in the app's lifespan, once the engine runs) restores the rollouts and runs the
  controller loop.
- **accounting**: ``finish_hook`` gives the ``RequestTracker`` hook of one attempt. When the
  request ends it records a :class:`~peftserve.canary.samples.RequestRecord` (its unit, the
  weight it was routed under, its segments, its outcome and what the engine says its steps were
  shared with; a stable answer that replaced a failed candidate is recorded outside the
  experiment, the failure itself counting against the candidate), registers the completion for
  feedback, and schedules the shadow copy. The engine replica that answered (Ray) is part of
  the record.
- **shadow copies**: after a shadowed stable request finished, a copy runs on the candidate in
  a background task: it never delays the answer and never reaches the client. The copy is
  greedy, or repeats the request's own sampling when it was seeded (reproducible either way),
  so ``exact_match`` (the copy's text equals stable's) is a fair agreement test for greedy and
  seeded traffic; for unseeded sampled traffic the LLR is the meaningful measure. The LLR is
  the mean per-token log-likelihood of stable's output under stable minus under the candidate,
  both teacher-forced with ``engine.score`` (a Monte-Carlo estimate of KL(stable || candidate),
  about 0 for identical weights, positive otherwise). Its noise floor is the same quantity
  between two scorings of that output by stable itself: the numerical noise of the engine
  (batch composition, kernels), which the candidate's LLR must exceed to count. Without
  ``engine.score`` the LLR is None and no noise floor is recorded. At most
  ``shadow_max_inflight`` copies run at once; others are skipped (and counted).
- **delete protection**: ``protects`` refuses deleting the stable or candidate version of an
  active rollout (registered in ``AdapterService.protectors``).
- **feedback**: ``record_feedback`` attributes a score to the request that answered. Where
  completions are registered by other processes (Ray ingress replicas push them in batches),
  ``late_completion_s`` lets an unknown id that was issued that recently wait for its record.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from anyio import to_thread
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from peftserve.canary.controller import (
    ControllerConfig,
    ControllerHooks,
    ProbeAnswer,
    RolloutController,
)
from peftserve.canary.metrics import MetricWindows
from peftserve.canary.samples import (
    PROBE_STRATUM,
    SHADOW_STRATUM,
    BatchShare,
    RequestRecord,
    length_bucket,
    stratum_of,
)
from peftserve.canary.spec import STATES
from peftserve.canary.store import RolloutStore
from peftserve.engine.engine import NON_FINITE_ERROR
from peftserve.engine.outputs import StepShare
from peftserve.engine.sampling_params import SamplingParams
from peftserve.server.completion_ids import issued_at
from peftserve.server.metrics import failure_outcome
from peftserve.server.model_table import Target, lora_id_of

if TYPE_CHECKING:
    from peftserve.canary.router import Router
    from peftserve.config import CanaryConfig
    from peftserve.engine.engine import AsyncLLMEngine
    from peftserve.engine.outputs import RequestOutput
    from peftserve.server.adapters import AdapterService
    from peftserve.server.metrics import FinishHook, Metrics, RequestTracker
    from peftserve.server.model_table import ModelTable

logger = logging.getLogger(__name__)

PREFIX = "peftserve"
STOP_TIMEOUT_S = 10.0
"""How long shutdown waits for the controller's current round."""
SHADOW_OUTCOMES = ("ok", "error", "skipped")
FEEDBACK_POLL_S = 0.1
"""How often feedback on a completion not known yet looks for it again (see record_feedback)."""


@dataclass
class InternalResult:
    """A generation the server ran for itself (a probe or a shadow copy)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    batch: StepShare | None = None
    served_by: str = ""
    """The engine replica that ran it (Ray Serve composition); empty in one process."""

    @property
    def failed(self) -> bool:
        return self.finish_reason == "error"

    @property
    def non_finite(self) -> bool:
        return self.error == NON_FINITE_ERROR


def shadow_params(params: SamplingParams) -> SamplingParams:
    """The copy's sampling: the request's own when reproducible (greedy or seeded), else
    greedy; one choice (compared with the request's choice 0) and no logprobs."""
    reproducible = params.greedy or params.seed is not None
    temperature = params.temperature if reproducible else 0.0
    return replace(params, logprobs=None, prompt_logprobs=None, n=1, temperature=temperature)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class RequestAccounting:
    """The canary side of the request path (the ingress's role): accounting and shadow copies.

    ``table`` routes (its router may be replaced by a newer snapshot at any time), ``engine``
    runs the shadow copies, ``windows`` receives the records (see the module docstring).
    """

    request_metrics: Metrics | None = None
    """The app's Prometheus metrics (set by the app): shadow copies are recorded with ``arm="shadow"``."""

    def __init__(
        self, table: ModelTable, engine: AsyncLLMEngine, config: CanaryConfig, windows: MetricWindows
    ) -> None:
        self.table = table
        self.engine = engine
        self.config = config
        self.windows = windows
        self.shadow_counts: dict[str, dict[str, int]] = {}
        self._shadows: set[asyncio.Task] = set()

    @property
    def router(self) -> Router:
        return self.table.router

    async def start(self) -> None:
        """Nothing to start on an ingress (its snapshot and pushes belong to its assembly)."""

    async def stop(self) -> None:
        """Cancel the shadow copies still running."""
        for task in list(self._shadows):
            task.cancel()
        await asyncio.gather(*self._shadows, return_exceptions=True)

    def close(self) -> None:
        """Nothing to close on an ingress."""

    # ---- generations for the server itself ---------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        lora_id: str | None,
        tracker: RequestTracker | None = None,
    ) -> InternalResult:
        """Run one generation for the server itself (no client); recorded only by ``tracker``."""
        result = InternalResult()
        start = time.perf_counter()
        outputs = self.engine.generate(request_id, prompt_ids, params, lora_id=lora_id)
        try:
            async for out in outputs:
                self._add(result, out, time.perf_counter() - start)
                if tracker is not None:
                    tracker.on_output(out)
        except BaseException as exc:
            if tracker is not None:
                tracker.finish(failure_outcome(exc))
            raise
        finally:
            await outputs.aclose()
        if tracker is not None:
            tracker.finish()
        return result

    @staticmethod
    def _add(result: InternalResult, out: RequestOutput, elapsed: float) -> None:
        if out.token_ids:
            if result.ttft is None:
                result.ttft = elapsed
            result.e2e = elapsed
        result.token_ids.extend(out.token_ids)
        result.text += out.text
        result.finish_reason = out.finish_reason
        result.error = out.error
        result.prompt_tokens = out.prompt_tokens
        if out.batch is not None:
            result.batch = out.batch
        result.served_by = out.served_by or result.served_by

    # ---- request accounting -------------------------------------------------------------

    def finish_hook(
        self,
        target: Target,
        completion_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        fallback: bool = False,
    ) -> FinishHook:
        """The tracker hook of one attempt at a request served by ``target``.

        ``fallback``: this attempt is stable answering for a failed candidate (recorded
        outside the experiment: the failure already counted once, against the candidate).
        """

        def on_finish(tracker: RequestTracker) -> None:
            out = tracker.last_output
            if out is None:  # refused before the engine ran it: says nothing about the version
                return
            record = self._account(target, tracker, out, fallback)
            if tracker.outcome != "ok" or record is None:
                return
            self.windows.register_completion(completion_id, record)
            decision = target.decision
            if decision is not None and decision.shadow and decision.shadow_version and not fallback:
                self._schedule_shadow(target, prompt_ids, params, list(tracker.token_ids), tracker.text)

        return on_finish

    def record_failure(self, target: Target) -> None:
        """A routed attempt that raised before the engine answered: an error of its version."""
        decision = target.decision
        if decision is None:
            return
        self.windows.record(self._record(target, decision.in_experiment, error=True))

    def _record(self, target: Target, in_experiment: bool, **outcome: Any) -> RequestRecord:
        decision = target.decision
        assert decision is not None
        labels = decision.labels
        if outcome.get("prompt_tokens") is not None:
            labels = (*labels, length_bucket(outcome["prompt_tokens"]))
        return RequestRecord(
            target.task, target.version, decision.unit, stratum_of(decision.weight), time.time(),
            arm=decision.arm if decision.reason != "no_rollout" else "", in_experiment=in_experiment,
            segments=labels, **outcome,
        )  # fmt: skip

    def _account(
        self, target: Target, tracker: RequestTracker, out: RequestOutput, fallback: bool
    ) -> RequestRecord | None:
        decision = target.decision
        if decision is None:
            return None
        error = out.finish_reason == "error"
        record = self._record(
            target, decision.in_experiment and not fallback,  # stable answering for a failed candidate: shown only
            error=error, non_finite=error and out.error == NON_FINITE_ERROR, ttft=tracker.ttft, tpot=tracker.tpot,
            e2e=tracker.e2e, output_tokens=out.completion_tokens, prompt_tokens=out.prompt_tokens,
            finish_reason=out.finish_reason if out.finished else "abort", batch=self._share(target.task, out.batch),
            replica=out.served_by,
        )  # fmt: skip
        self.windows.record(record)
        return record

    def _share(self, task: str, share: StepShare | None) -> BatchShare | None:
        """The engine's per-adapter step counts in the rollout's terms (stable, candidate, other)."""
        if share is None:
            return None
        rollout = self.router.rollout(task)
        stable = lora_id_of(task, rollout.spec.stable) if rollout is not None else None
        candidate = lora_id_of(task, rollout.spec.candidate) if rollout is not None else None
        out = BatchShare(share.steps, share.step_s, share.tokens)
        for lora_id, (steps, tokens) in share.adapters.items():
            if lora_id is not None and lora_id == stable:
                out.stable_steps, out.stable_tokens = steps, tokens
            elif lora_id is not None and lora_id == candidate:
                out.candidate_steps, out.candidate_tokens = steps, tokens
            else:
                out.other_steps += steps
                out.other_tokens += tokens
        return out

    # ---- shadow copies ------------------------------------------------------------------

    def _count_shadow(self, task: str, outcome: str) -> None:
        counts = self.shadow_counts.setdefault(task, dict.fromkeys(SHADOW_OUTCOMES, 0))
        counts[outcome] += 1

    def _schedule_shadow(
        self,
        target: Target,
        prompt_ids: list[int],
        params: SamplingParams,
        stable_ids: list[int],
        stable_text: str,
    ) -> None:
        if len(self._shadows) >= self.config.shadow_max_inflight:
            self._count_shadow(target.task, "skipped")
            logger.debug(
                "task %s: shadow copy skipped (%d running)", target.task, len(self._shadows)
            )
            return
        work = self._run_shadow(target, prompt_ids, params, stable_ids, stable_text)
        task = asyncio.get_running_loop().create_task(work, name=f"shadow-{target.task}")
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _run_shadow(
        self,
        target: Target,
        prompt_ids: list[int],
        params: SamplingParams,
        stable_ids: list[int],
        stable_text: str,
    ) -> None:
        await asyncio.sleep(0)  # after the stable answer is on its way
        decision = target.decision
        assert decision is not None and decision.shadow_version is not None
        task, stable, candidate = target.task, target.version, decision.shadow_version
        metrics = self.request_metrics
        tracker = metrics.track(task, candidate, "shadow") if metrics is not None else None
        try:
            copy = await self.generate(f"shadow-{uuid.uuid4().hex}", prompt_ids, shadow_params(params),
                                       lora_id_of(task, candidate), tracker)  # fmt: skip
        except (
            Exception
        ) as e:  # refused before the engine ran it (queue full, adapter gone): not judged
            logger.warning(
                "task %s: shadow copy on %s skipped: %s: %s", task, candidate, type(e).__name__, e
            )
            self._count_shadow(task, "skipped")
            return
        llr = (
            None
            if copy.failed
            else await self._llr(task, stable, candidate, prompt_ids, stable_ids)
        )
        self.windows.record_shadow(task, candidate, exact_match=not copy.failed and copy.text == stable_text,
                                   llr=llr, e2e=copy.e2e, error=copy.failed)  # fmt: skip
        self.windows.record(RequestRecord(
            task, candidate, decision.unit, SHADOW_STRATUM, time.time(), arm="candidate", error=copy.failed,
            non_finite=copy.non_finite, finish_reason=copy.finish_reason, e2e=copy.e2e, ttft=copy.ttft,
            output_tokens=len(copy.token_ids), prompt_tokens=len(prompt_ids), segments=decision.labels,
            batch=self._share(task, copy.batch), replica=copy.served_by,
        ))  # fmt: skip
        self._count_shadow(task, "error" if copy.failed else "ok")

    async def _llr(
        self, task: str, stable: str, candidate: str, prompt_ids: list[int], target_ids: list[int]
    ) -> float | None:
        """Mean log-likelihood of ``target_ids`` under stable minus under candidate; also records
        the noise floor (stable against a second scoring by stable). None without engine.score."""
        score = getattr(self.engine, "score", None)
        if score is None or not target_ids:
            return None
        try:
            stable_lp = await score(prompt_ids, target_ids, lora_id_of(task, stable))
            candidate_lp = await score(prompt_ids, target_ids, lora_id_of(task, candidate))
            again_lp = await score(prompt_ids, target_ids, lora_id_of(task, stable))
        except Exception as e:  # no context room, non-finite candidate, adapter gone: no LLR
            logger.info("task %s: shadow LLR not computed: %s: %s", task, type(e).__name__, e)
            return None
        self.windows.record_noise_floor(task, _mean(stable_lp) - _mean(again_lp))
        return _mean(stable_lp) - _mean(candidate_lp)


class CanaryRuntime(RequestAccounting):
    """The rollout controller, its hooks, delete protection and feedback (the controller's role),
    with the request path's accounting into its own metric windows (one process runs both)."""

    def __init__(
        self, service: AdapterService, engine: AsyncLLMEngine, config: CanaryConfig, data_dir: str
    ) -> None:
        windows = MetricWindows(feedback_ttl_s=config.feedback_ttl_s)
        super().__init__(service.table, engine, config, windows)
        self.service = service
        self.store = RolloutStore(data_dir)
        self.controller = RolloutController(
            self.store, self.windows, self.router, self._hooks(), config=self._controller_config()
        )
        self.late_completion_s = 0.0
        """An unknown completion id issued this recently may still be on its way (see record_feedback)."""
        self._loop_task: asyncio.Task | None = None
        service.protectors.append(self.protects)

    def _controller_config(self) -> ControllerConfig:
        c = self.config
        return ControllerConfig(
            interval_s=c.canary_interval_s, promote_keep_warm_s=c.promote_keep_warm_s,
            rollback_keep_warm_s=c.rollback_keep_warm_s, probes_per_tick=c.probes_per_tick,
        )  # fmt: skip

    def _hooks(self) -> ControllerHooks:
        return ControllerHooks(
            versions=self._versions, ensure_loaded=self._ensure_loaded, unload=self._unload,
            set_stable=self._set_stable, probe=self._probe if self.config.probes_per_tick > 0 else None,
            ended=self._ended,
        )  # fmt: skip

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Restore the stored rollouts (the engine must run: candidates are loaded) and run the loop."""
        restored = await self.controller.restore()
        if restored:
            logger.info("restored %d active rollout(s)", len(restored))
        self._loop_task = asyncio.create_task(self.controller.run(), name="rollout-controller")

    async def stop(self) -> None:
        """Stop the controller loop and the shadow copies (before the engine stops)."""
        self.controller.stop()
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(self._loop_task, STOP_TIMEOUT_S)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                logger.warning("rollout controller did not stop in %g s; cancelled", STOP_TIMEOUT_S)
            self._loop_task = None
        await super().stop()

    def close(self) -> None:
        self.store.close()

    # ---- controller hooks ---------------------------------------------------------------

    async def _versions(self, task: str) -> Collection[str] | None:
        versions = self.table.versions.get(task)
        return set(versions) if versions else None

    async def _ensure_loaded(self, task: str, version: str) -> None:
        await self.service.load(task, version)

    async def _unload(self, task: str, version: str) -> None:
        if lora_id_of(task, version) in self.engine.lora_status():
            await self.service.unload(task, version)

    async def _set_stable(self, task: str, version: str) -> None:
        await to_thread.run_sync(self.service.stable.set, task, version)
        self.table.set_stable(task, version)

    async def _probe(self, task: str, version: str, prompt: str, temperature: float) -> ProbeAnswer:
        """One probe of ``task@version`` on its twin; an engine failure other than non-finite
        logits raises (an evaluator error, never the version's)."""
        llm = self.engine.engine
        ids = list(llm.tokenizer(prompt)["input_ids"])
        room = llm.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"probe prompt has {len(ids)} tokens; the context holds {llm.max_model_len}")
        twin = await self.service.probe_twin(task, version)
        params = SamplingParams(max_tokens=min(self.config.probe_max_tokens, room), temperature=temperature)
        result = await self.generate(f"probe-{uuid.uuid4().hex}", ids, params, twin)
        if result.failed and not result.non_finite:
            raise RuntimeError(f"the engine failed the probe: {result.error}")
        record = RequestRecord(
            task, version, 0, PROBE_STRATUM, time.time(), error=result.failed, non_finite=result.non_finite,
            finish_reason=result.finish_reason, e2e=result.e2e, ttft=result.ttft,
            output_tokens=len(result.token_ids), prompt_tokens=len(ids), batch=self._share(task, result.batch),
            replica=result.served_by,
        )  # fmt: skip
        return ProbeAnswer(result.text, record)

    async def _ended(self, task: str, stable: str, candidate: str) -> None:
        for version in (stable, candidate):
            try:
                await self.service.drop_probe_twin(task, version)
            except Exception:  # the twin goes with a restart anyway
                logger.exception("task %s: dropping the probe twin of %s failed", task, version)

    # ---- delete protection --------------------------------------------------------------

    def protects(self, task: str, version: str) -> bool:
        """Whether ``task@version`` is the stable or candidate version of an active rollout."""
        rollout = self.router.rollout(task)
        return rollout is not None and version in (rollout.spec.stable, rollout.spec.candidate)

    # ---- feedback -----------------------------------------------------------------------

    async def record_feedback(self, completion_id: str, score: float) -> bool:
        """Attribute ``score`` to the request that answered ``completion_id``; False if unknown.

        An unknown id issued less than ``late_completion_s`` ago may have been answered by
        another process whose records have not arrived yet: it is looked up again until then.
        """
        if self.windows.record_feedback(completion_id, score):
            return True
        issued = issued_at(completion_id)
        if issued is None:
            return False
        deadline = issued + self.late_completion_s
        while time.time() < deadline:
            await asyncio.sleep(min(FEEDBACK_POLL_S, max(deadline - time.time(), 0.0)))
            if self.windows.record_feedback(completion_id, score):
                return True
        return False


class RolloutCollector(Collector):
    """Rollout gauges and counters per task, read from the controller at every scrape.

    Ratios are 0-1 (Prometheus base units): the canary weight, the last judgment's progress toward
    the next decision, and per arm of an active rollout (``arm`` stable or candidate, with its
    ``version``) the probe accuracy and mean feedback score of the rollout's evidence, with its
    sample counts beside them.
    """

    def __init__(self, runtime: CanaryRuntime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        snap = self._runtime.controller.metrics_snapshot()
        tasks: dict[str, dict[str, Any]] = snap["tasks"]
        yield self._per_task("canary_weight_ratio", "Candidate share of the task's traffic (0-1).",
                             tasks, "weight", scale=0.01)  # fmt: skip
        yield self._per_task("rollout_progress_ratio", "Share (0-1) of the evidence the next decision needs, "
                             "from the latest judgment.", tasks, "last_progress")  # fmt: skip
        yield self._states(tasks)
        yield self._counts("rollout_judgments", "Judgments by result.", snap["judgments"], "result")
        yield self._counts(
            "rollout_decisions", "Controller decisions by action.", snap["decisions"], "action"
        )
        yield self._counts("canary_shadow_copies", "Shadow copies by outcome (ok, error, skipped).",
                           self._runtime.shadow_counts, "outcome")  # fmt: skip
        yield GaugeMetricFamily(f"{PREFIX}_rollouts_active", "Rollouts in shadow, ramping or paused.",
                                value=float(snap["active_rollouts"]))  # fmt: skip
        yield GaugeMetricFamily(f"{PREFIX}_rollout_pending_unloads", "Versions waiting to be unloaded.",
                                value=float(snap["pending_unloads"]))  # fmt: skip
        yield from self._arms()

    def _arms(self) -> Iterator[Metric]:
        labels = ["task", "version", "arm"]
        accuracy = GaugeMetricFamily(f"{PREFIX}_canary_probe_accuracy_ratio", "Share of known-answer probes "
                                     "answered exactly, per arm, during the rollout.", labels=labels)  # fmt: skip
        feedback = GaugeMetricFamily(f"{PREFIX}_canary_feedback_score_ratio", "Mean user feedback score "
                                     "(0-1), per arm, during the rollout.", labels=labels)  # fmt: skip
        samples = GaugeMetricFamily(f"{PREFIX}_canary_window_samples", "Samples per arm of the rollout, "
                                    "window, by kind (requests, probes, feedback).", labels=[*labels, "kind"])  # fmt: skip
        router, windows = self._runtime.router, self._runtime.windows
        for task in sorted(router.tasks):
            rollout = router.rollout(task)
            if rollout is None:
                continue
            spec = rollout.spec
            for arm, version in (("stable", spec.stable), ("candidate", spec.candidate)):
                s = windows.summary(task, version)
                if s.get("probe_accuracy") is not None:
                    accuracy.add_metric([task, version, arm], float(s["probe_accuracy"]))
                if s.get("mean_feedback_score") is not None:
                    feedback.add_metric([task, version, arm], float(s["mean_feedback_score"]))
                for kind, key in (
                    ("requests", "in_experiment"),
                    ("probes", "probes"),
                    ("feedback", "feedback"),
                ):
                    samples.add_metric([task, version, arm, kind], float(s.get(key) or 0))
        yield from (accuracy, feedback, samples)

    @staticmethod
    def _per_task(
        name: str, doc: str, tasks: dict[str, dict[str, Any]], key: str, *, scale: float = 1.0
    ) -> Metric:
        family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["task"])
        for task, values in sorted(tasks.items()):
            if values.get(key) is not None:
                family.add_metric([task], float(values[key]) * scale)
        return family

    @staticmethod
    def _states(tasks: dict[str, dict[str, Any]]) -> Metric:
        family = GaugeMetricFamily(f"{PREFIX}_rollout_state", "1 for the task's rollout state, 0 for the others.",
                                   labels=["task", "state"])  # fmt: skip
        for task, values in sorted(tasks.items()):
            for state in STATES:
                family.add_metric([task, state], 1.0 if values.get("state") == state else 0.0)
        return family

    @staticmethod
    def _counts(name: str, doc: str, table: dict[str, dict[str, int]], label: str) -> Metric:
        family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["task", label])
        for task, counts in sorted(table.items()):
            for key, count in sorted(counts.items()):
                family.add_metric([task, key], float(count))
        return family
