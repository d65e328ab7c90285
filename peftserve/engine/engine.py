"""The step loop: schedule -> run -> sample -> token outputs; and its asyncio front.

``LLMEngine`` is single-threaded: call ``step()`` until ``has_unfinished_requests()`` is
False. The step loop itself (``step_tokens``) produces token ids only; ``step()`` turns
them into text with an ``OutputProcessor`` (detokenization, stop strings) inline.
``AsyncLLMEngine`` runs the step loop in one background thread and the output processing
in another (``OutputThread``), so neither the engine thread nor the asyncio event loop
detokenizes. Requests, aborts and adapter changes reach the engine thread through a command
list applied between steps; outputs travel from the output thread to each request's asyncio
queue with ``call_soon_threadsafe``. The async front uses the engine's public methods only.

Adapters live in three tiers (``peftserve.lora.cache``): GPU slots, a CPU cache and disk.
A registered adapter is servable at once; a request for one that is not resident waits
while it is loaded, and the scheduler admits it when its adapter has a slot. In the async
engine the disk reads run on a small loader thread pool, so running sequences keep going.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from peftserve.config import EngineConfig
from peftserve.engine.block_manager import BlockManager
from peftserve.engine.model_runner import ModelRunner
from peftserve.engine.output_processor import OutputProcessor, OutputThread
from peftserve.engine.outputs import RawLogprob, RequestOutput, StepRecord, TokenOutput
from peftserve.engine.sampler import Sampler, SamplerOutput
from peftserve.engine.sampling_params import InvalidParameter, SamplingParams
from peftserve.engine.scheduler import Scheduler, SchedulerOutput
from peftserve.engine.sequence import Sequence, choice_id
from peftserve.lora.cache import AdapterTiers, Fetched, LoadCallback, Loader
from peftserve.lora.manager import SlotsBusy
from peftserve.lora.peft_adapter import AdapterError

if TYPE_CHECKING:
    from peftserve.lora.peft_adapter import LoRAAdapter

__all__ = [
    "AdapterError", "AsyncLLMEngine", "EngineStats", "LLMEngine", "QueueFull", "SlotsBusy", "UnknownAdapter",
]

logger = logging.getLogger(__name__)

NON_FINITE_ERROR = "the model produced non-finite logits (NaN or inf)"
ADAPTER_LOAD_WORKERS = 2
"""Threads of the async engine that read adapters from disk."""
IDLE_WAIT_S = 0.05
"""How long the async loop sleeps when nothing could be scheduled (all waiting on loads)."""


class QueueFull(Exception):
    """The waiting queue holds ``SchedulerConfig.max_waiting`` requests; try again later."""


class UnknownAdapter(ValueError):
    """The request names an adapter that is not registered (or is being removed)."""


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0
    """Tokens run through the model (prefill chunks, recomputation and decode tokens)."""
    generated_tokens: int = 0
    requests_finished: int = 0
    max_loras_in_step: int = 0
    """Most distinct adapters (slot != 0) in one step."""
    mixed_lora_steps: int = 0
    """Steps holding at least two distinct slots (base model included)."""
    num_preemptions: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    gpu_slots_used: int = 0
    """Adapter slots holding an adapter."""
    gpu_slots_total: int = 0
    cpu_cache_used: int = 0
    """Adapters in the CPU cache (not counting the resident ones)."""
    cpu_cache_total: int = 0
    cpu_cache_hits: int = 0
    """Adapters made resident from the CPU cache."""
    cpu_cache_misses: int = 0
    """Disk loads of adapters that were needed and not in host memory."""
    adapter_loads: int = 0
    """Adapters written into a slot."""
    adapter_evictions: int = 0
    """Adapters moved off the GPU (to make room, or by unload_lora)."""
    adapter_load_seconds_total: float = 0.0
    """Sum of adapter load times (disk read included for loads from disk)."""


class LLMEngine:
    """Base model + LoRA slots + paged KV cache + continuous-batching scheduler."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size)
        self.tiers = AdapterTiers(
            self.lora_manager, config.lora.max_cpu_adapters, self.dtype, pin=self.device.type == "cuda"
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.tiers)
        generator = torch.Generator(device=self.device).manual_seed(config.model.seed)
        self.sampler = Sampler(generator)
        self._outputs = OutputProcessor(self.tokenizer)  # the text side of add_request/step
        self.eos_token_ids = _eos_token_ids(self.runner)
        self._stats = EngineStats(kv_blocks_total=self.block_manager.num_blocks)
        self._lora_users: dict[str, int] = defaultdict(int)  # queued + running sequences per adapter
        self._choices: dict[str, list[str]] = {}  # request id -> its unfinished choices (n > 1 only)
        self._draining: set[str] = set()  # unregistered; dropped when their last request ends

    # -- what the API layer reads -----------------------------------------------------

    @property
    def tokenizer(self):
        return self.runner.tokenizer

    @property
    def model_config(self):
        """The base model's Hugging Face config."""
        return self.runner.hf_config

    @property
    def model(self) -> torch.nn.Module:
        """The base model (LoRA injected); ``load_adapter`` validates adapters against it."""
        return self.runner.model

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    @property
    def lora_manager(self):
        return self.runner.lora_manager

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the counters and gauges."""
        return dataclasses.replace(
            self._stats,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.block_manager.num_used_blocks,
            gpu_slots_used=self.lora_manager.num_used_slots,
            gpu_slots_total=self.lora_manager.num_slots - 1,
            cpu_cache_used=len(self.tiers.cpu),
            cpu_cache_total=self.tiers.cpu.capacity,
            **dataclasses.asdict(self.tiers.counters),
        )

    # -- adapters --------------------------------------------------------------------

    @property
    def on_adapter_load(self) -> LoadCallback | None:
        """Called as ``(lora_id, seconds, source)`` after each adapter is made resident,
        source 'cpu' or 'disk' (disk read included in seconds); runs on the engine thread."""
        return self.tiers.on_load

    @on_adapter_load.setter
    def on_adapter_load(self, callback: LoadCallback | None) -> None:
        self.tiers.on_load = callback

    def register_lora(self, lora_id: str, loader: Loader) -> None:
        """Make ``lora_id`` servable at once; ``loader`` reads and validates it when a request
        needs it (it need not be resident). Registering an idle id again replaces it."""
        self._check_replaceable(lora_id)
        self.tiers.register(lora_id, loader)
        logger.info("adapter %s registered", lora_id)

    def add_lora(self, lora_id: str, adapter: LoRAAdapter) -> int:
        """Register an adapter already in memory, resident at once if a slot is free.

        Returns its slot, or 0 when every slot is taken (it then waits in the CPU cache).
        An idle id is replaced; one with requests raises ValueError.
        """
        self._check_replaceable(lora_id)
        slot = self.tiers.add(lora_id, adapter)
        logger.info("adapter %s added (%s)", lora_id, f"slot {slot}" if slot else "CPU cache")
        return slot

    def unregister_lora(self, lora_id: str) -> None:
        """Refuse new requests for ``lora_id`` at once (UnknownAdapter); once its queued and
        running requests end, drop it from every tier."""
        self._check_servable(lora_id)
        self._draining.add(lora_id)
        self._drop_if_idle(lora_id)

    def remove_lora(self, lora_id: str) -> None:
        """``unregister_lora``."""
        self.unregister_lora(lora_id)

    def load_lora(self, lora_id: str) -> int:
        """Make ``lora_id`` resident now and return its slot, evicting the least recently
        used idle adapter if needed. Raises SlotsBusy when every slot holds an adapter with
        running requests, AdapterError when its loader fails (the disk is read inline here;
        ``AsyncLLMEngine.load_lora`` reads it on a loader thread first)."""
        self._check_servable(lora_id)
        return self.tiers.make_resident(lora_id, self._protected_adapters())

    def unload_lora(self, lora_id: str) -> bool:
        """Move ``lora_id`` off the GPU to the CPU cache; it stays registered and a later
        request loads it back. With running requests the unload is deferred until they end
        (returns False; its waiting requests are held back meanwhile)."""
        self._check_servable(lora_id)
        return self.tiers.request_unload(lora_id, self.scheduler.busy_adapters())

    def lora_status(self) -> dict[str, str]:
        """Tier of every registered adapter: 'gpu', 'cpu' or 'disk' (a snapshot)."""
        return {i: tier for i, tier in self.tiers.statuses().items() if i not in self._draining}

    def waiting_lora_ids(self) -> set[str]:
        """Adapters of the requests waiting for admission (a snapshot; any thread may call it:
        copying the queue is one step under the GIL)."""
        return {seq.lora_id for seq in list(self.scheduler.waiting) if seq.lora_id is not None}

    def _check_replaceable(self, lora_id: str) -> None:
        if lora_id in self._draining or self._lora_users.get(lora_id):
            raise ValueError(f"adapter {lora_id!r} is in use by requests; unregister it and wait")

    def _check_servable(self, lora_id: str) -> None:
        if lora_id in self._draining or not self.tiers.is_registered(lora_id):
            raise UnknownAdapter(f"adapter {lora_id!r} is not registered")

    def _protected_adapters(self) -> set[str]:
        """Adapters an explicit load may not evict: those running, and the next one to admit."""
        busy = self.scheduler.busy_adapters()
        waiting = self.scheduler.waiting
        if waiting and waiting[0].lora_id is not None:
            busy.add(waiting[0].lora_id)
        return busy

    def _drop_if_idle(self, lora_id: str) -> None:
        if lora_id in self._draining and not self._lora_users.get(lora_id):
            self._draining.discard(lora_id)
            self._lora_users.pop(lora_id, None)
            self.tiers.drop(lora_id)
            logger.info("adapter %s unregistered", lora_id)

    def set_adapter_fetcher(self, fetcher: Callable[[Callable[[], Fetched]], None] | None) -> None:
        """Run adapter disk loads through ``fetcher`` (it gets a job to run elsewhere, whose
        result must come back through ``apply_fetched`` between steps); None: load inline
        again and forget the loads in flight."""
        self.tiers.fetcher = fetcher
        if fetcher is None:
            self.tiers.forget_loads()

    def adapter_fetch_job(self, lora_id: str) -> Callable[[], Fetched] | None:
        """The disk read ``load_lora`` needs first, to run off the engine thread (None: none)."""
        self._check_servable(lora_id)
        return self.tiers.admin_fetch_job(lora_id)

    def apply_fetched(self, result: Fetched) -> list[TokenOutput]:
        """Take a background disk load's result; the final outputs of requests it failed."""
        self.tiers.fetched(result)
        return self._fail_unloadable()

    def _fail_unloadable(self) -> list[TokenOutput]:
        """End the waiting requests of adapters whose disk load failed."""
        failed = self.tiers.take_failures()
        if not failed:
            return []
        seqs = [seq for seq in self.scheduler.waiting if seq.lora_id in failed]
        return [
            out
            for seq in seqs
            for out in self._finish_outputs(
                seq, "error", f"adapter {seq.lora_id!r} could not be loaded: {failed[seq.lora_id]}"
            )
        ]

    # -- requests --------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora_id: str | None = None,
    ) -> None:
        """Queue a request; raises QueueFull, InvalidParameter or UnknownAdapter (ValueErrors).
        ``step()`` returns its outputs."""
        seq = self.make_request(request_id, prompt_token_ids, params, lora_id)
        if self.num_waiting >= self.max_waiting:
            raise QueueFull(f"{self.num_waiting} requests are waiting already")
        self.enqueue(seq)
        self._outputs.add_request(request_id, list(seq.token_ids), params, seq.steps)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def max_waiting(self) -> int:
        """Bound of the waiting queue (``SchedulerConfig.max_waiting``)."""
        return self.config.scheduler.max_waiting

    def make_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lora_id: str | None = None
    ) -> Sequence:
        """Validate a request and build its sequence, touching no engine state (so another
        thread may call it); ``enqueue`` it on the engine thread. Raises like ``add_request``
        except QueueFull, which is the caller's check."""
        if self.scheduler.get(request_id) is not None:
            raise ValueError(f"request id {request_id!r} is already in use")
        if lora_id is not None:
            self._check_servable(lora_id)
        prompt = list(prompt_token_ids)
        self._check_prompt(prompt, params)
        self._check_choices(params)
        return Sequence(
            request_id=request_id,
            token_ids=prompt,
            num_prompt_tokens=len(prompt),
            params=params,
            lora_id=lora_id,
            num_forks=params.n - 1,
        )

    def _check_choices(self, params: SamplingParams) -> None:
        seats = self.config.scheduler.max_num_seqs
        if params.n > seats:
            raise InvalidParameter("n", f"n must be at most {seats} (the server's max_num_seqs), got {params.n}")
        vocab = self.model_config.vocab_size
        bad = [t for t in params.logit_bias if not 0 <= t < vocab]
        if bad:
            raise InvalidParameter("logit_bias", f"logit_bias token ids must be in 0..{vocab - 1}, got {bad[0]}")

    def _check_prompt(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise InvalidParameter("prompt", "the prompt holds no tokens")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InvalidParameter("prompt", f"prompt token ids must be in 0..{vocab - 1}")
        n, limit = len(prompt), self.max_model_len
        if n >= limit:
            raise InvalidParameter("prompt", f"the prompt has {n} tokens; the context holds {limit}")
        if n + params.max_tokens > limit:
            raise InvalidParameter(
                "max_tokens",
                f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the context of"
                f" {limit} tokens; ask for at most {limit - n}",
            )

    def enqueue(self, seq: Sequence) -> None:
        """Queue a sequence from ``make_request``; UnknownAdapter if its adapter went since."""
        if seq.lora_id is not None:
            self._check_servable(seq.lora_id)  # again: the adapter may have gone since
        self.scheduler.add(seq)
        if seq.num_forks:
            self._choices[seq.request_id] = [seq.request_id]
        if seq.lora_id is not None:
            self._lora_users[seq.lora_id] += 1
            self.tiers.prefetch(seq.lora_id)

    def _adopt(self, sched: SchedulerOutput) -> None:
        """Count the choices the scheduler forked or queued this step as the engine's own."""
        children = [c for _, forked in sched.forks for c in forked] + sched.spawned
        for child in children:
            self._choices.setdefault(child.request, []).append(child.request_id)
            if child.lora_id is not None:
                self._lora_users[child.lora_id] += 1

    def abort_request(self, request_id: str) -> None:
        """Drop a request (every choice of it) and free its KV blocks (no output; unknown ids
        are ignored)."""
        for choice in self._choices.pop(request_id, [request_id]):
            seq = self.scheduler.get(choice)
            if seq is not None:
                self._finish(seq, "abort")
        self._outputs.drop(request_id)

    def stop_request(self, request_id: str) -> None:
        """End a request its output side stopped (a stop string matched): free its blocks,
        no output (unknown ids are ignored)."""
        seq = self.scheduler.get(request_id)
        if seq is not None:
            self._finish(seq, "stop")

    def finish_all(self, reason: str, error: str | None = None) -> list[TokenOutput]:
        """End every unfinished request with ``reason``; their final token outputs."""
        seqs = list(self.scheduler.running) + list(self.scheduler.waiting)
        return [out for seq in seqs for out in self._finish_outputs(seq, reason, error)]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the step ----------------------------------------------------------------------

    def score(self, prompt_ids: list[int], target_ids: list[int], lora_id: str | None = None) -> list[float]:
        """Teacher-forced log p(target_i | prompt, target_<i) under ``lora_id``, from one prefill.

        Runs steps until done, so it needs an otherwise idle engine (the async engine's
        ``score`` has no such limit)."""
        if self.has_unfinished_requests():
            raise RuntimeError("LLMEngine.score needs an idle engine; use AsyncLLMEngine.score")
        self.add_request(*_score_request(prompt_ids, target_ids), lora_id)
        outs: list[RequestOutput] = []
        while self.has_unfinished_requests():
            outs += self.step()
        final = outs[-1]
        if final.prompt_logprobs is None or final.finish_reason == "error":
            raise RuntimeError(f"scoring failed: {final.error}")
        return final.prompt_logprobs

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run the packed batch, sample, then detokenize."""
        return self._process_outputs(self.step_tokens())

    def step_with_logits(self) -> tuple[list[RequestOutput], dict[str, torch.Tensor]]:
        """``step()``, plus the fp32 logits [V] each sampled request's token was drawn from."""
        outputs, logits, seqs = self._step()
        return self._process_outputs(outputs), {seq.request_id: logits[i] for i, seq in enumerate(seqs)}

    def step_tokens(self) -> list[TokenOutput]:
        """One iteration of the step loop: schedule, run the packed batch, sample; token ids
        only (an ``OutputProcessor`` makes text of them). Requests added with ``add_request``
        get their text from ``step()`` instead."""
        return self._step()[0]

    def _process_outputs(self, outputs: list[TokenOutput]) -> list[RequestOutput]:
        results, stopped = self._outputs.process(outputs)
        for request_id in stopped:
            self.stop_request(request_id)
        return results

    @torch.inference_mode()
    def _step(self) -> tuple[list[TokenOutput], torch.Tensor, list[Sequence]]:
        self.tiers.apply_pending_unloads(self.scheduler.busy_adapters())
        sched = self.scheduler.schedule()  # may make adapters resident (between steps)
        self._adopt(sched)
        failed = self._fail_unloadable()
        if not sched.seqs:
            return failed, torch.empty(0), []
        self.runner.zero_blocks(self.block_manager.take_fresh())
        started = time.perf_counter()
        try:
            logits, seqs, sampling = self.runner.execute(sched)  # [S, V]
            self.runner.copy_blocks(sched.block_copies)  # forked choices: the prompt's last block
        except Exception as exc:  # a broken forward ends the step's requests, not the engine
            logger.exception("model forward failed")
            return failed + self.finish_all("error", f"engine step failed: {exc}"), torch.empty(0), []
        for seq, n in zip(sched.seqs, sched.num_tokens, strict=True):
            seq.num_computed_tokens += n
        self._record(sched)
        if not seqs:
            _share_step(sched, time.perf_counter() - started)
            return failed, logits, seqs
        sampled = self.sampler(logits, sampling)
        _share_step(sched, time.perf_counter() - started)  # sampling synchronizes: the step is done
        return failed + self._token_outputs(seqs, sampled), logits, seqs

    def _record(self, sched: SchedulerOutput) -> None:
        stats = self._stats
        stats.steps += 1
        stats.tokens += sched.total_tokens
        stats.num_preemptions += sched.num_preempted
        slots = {seq.slot for seq in sched.seqs}
        stats.max_loras_in_step = max(stats.max_loras_in_step, len(slots - {0}))
        stats.mixed_lora_steps += len(slots) >= 2
        for lora_id in {seq.lora_id for seq in sched.seqs} - {None}:
            self.tiers.touch(lora_id)

    def _token_outputs(self, seqs: list[Sequence], sampled: SamplerOutput) -> list[TokenOutput]:
        """Append each sampled token to its sequence, end the sequences that are done."""
        return [
            self._append_token(seq, tok, ok, lp)
            for seq, tok, ok, lp in zip(seqs, sampled.token_ids, sampled.finite, sampled.logprobs, strict=True)
        ]

    def _append_token(self, seq: Sequence, token: int, finite: bool, logprob: RawLogprob | None) -> TokenOutput:
        if not finite:
            # its KV may hold NaN: never let it leak (blocks shared with its other choices stay)
            self.runner.zero_blocks(self.block_manager.exclusive_blocks(seq))
            return self._finish_output(seq, "error", NON_FINITE_ERROR)
        seq.token_ids.append(token)
        self._stats.generated_tokens += 1
        reason = self._stop_reason(seq, token)
        logprobs = [logprob] if logprob is not None else None
        prompt = _prompt_logprobs(seq) if seq.num_generated == 1 else None  # with the first token
        if reason is not None:
            self._finish(seq, reason)
        return TokenOutput(seq.request_id, [token], reason, logprobs=logprobs, prompt_logprobs=prompt)

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if seq.num_generated >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.finish_reason = reason
        seq.error = error
        self.scheduler.finish(seq)
        self._stats.requests_finished += 1
        choices = self._choices.get(seq.request)
        if choices is not None:
            choices.remove(seq.request_id)
            if not choices:
                del self._choices[seq.request]
        if seq.lora_id is not None:
            self._lora_users[seq.lora_id] -= 1
            self._drop_if_idle(seq.lora_id)

    def _finish_output(self, seq: Sequence, reason: str, error: str | None = None) -> TokenOutput:
        """End ``seq`` without a new token; its final output."""
        self._finish(seq, reason, error)
        return TokenOutput(seq.request_id, [], reason, error, prompt_logprobs=_prompt_logprobs(seq))

    def _finish_outputs(self, seq: Sequence, reason: str, error: str | None = None) -> list[TokenOutput]:
        """``_finish_output``, plus the final outputs of the choices it had yet to fork."""
        unforked = [choice_id(seq.request, seq.index + k) for k in range(1, seq.num_forks + 1)]
        seq.num_forks = 0
        final = self._finish_output(seq, reason, error)
        return [final, *(TokenOutput(choice, [], reason, error) for choice in unforked)]


def _share_step(sched: SchedulerOutput, seconds: float) -> None:
    """Give every sequence of the step a reference to the step's record (O(1) per sequence);
    the output side sums a request's records once, when it finishes (``outputs.step_share``)."""
    adapters: dict[str | None, int] = {}
    for seq, n in zip(sched.seqs, sched.num_tokens, strict=True):
        adapters[seq.lora_id] = adapters.get(seq.lora_id, 0) + n
    record = StepRecord(seconds, sched.total_tokens, adapters)
    for seq in sched.seqs:
        seq.steps.append(record)


def _score_request(prompt_ids: list[int], target_ids: list[int]) -> tuple[str, list[int], SamplingParams]:
    """A one-token request whose prefill scores ``target_ids`` after ``prompt_ids``."""
    params = SamplingParams(max_tokens=1, temperature=0.0, score_from=len(prompt_ids), ignore_eos=True)
    return f"score-{uuid.uuid4().hex}", list(prompt_ids) + list(target_ids), params


def _prompt_logprobs(seq: Sequence) -> list[RawLogprob] | None:
    start = seq.params.scored_from
    if start is None:
        return None
    return [seq.prompt_logprobs[i] for i in range(start, seq.num_prompt_tokens) if i in seq.prompt_logprobs]


def _eos_token_ids(runner: ModelRunner) -> frozenset[int]:
    """EOS ids of the generation config, the model config and the tokenizer, together."""
    ids: set[int] = set()
    gen_config = getattr(runner.model, "generation_config", None)
    for source in (gen_config, runner.hf_config, runner.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    unfinished: int = 1
    """Choices of the request not finished yet (its stream ends with the last)."""


class AsyncLLMEngine:
    """Runs an ``LLMEngine`` step loop in one background thread and the output processing
    (detokenization, stop strings) in another, for asyncio callers."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._commands: list[Callable[[], None]] = []
        self._streams: dict[str, _Stream] = {}
        self._num_pending_adds = 0
        self._thread: threading.Thread | None = None
        self._loads: ThreadPoolExecutor | None = None  # disk reads of adapters
        self._stopping = False
        self._output = OutputThread(engine.tokenizer, self._publish, self._stop_in_engine)

    @property
    def engine(self) -> LLMEngine:
        return self._engine

    @property
    def stats(self) -> EngineStats:
        return self._engine.stats

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def on_adapter_load(self) -> LoadCallback | None:
        """See ``LLMEngine.on_adapter_load`` (called on the engine thread)."""
        return self._engine.on_adapter_load

    @on_adapter_load.setter
    def on_adapter_load(self, callback: LoadCallback | None) -> None:
        self._engine.on_adapter_load = callback

    def lora_status(self) -> dict[str, str]:
        """Tier of every registered adapter: 'gpu', 'cpu' or 'disk' (a snapshot read from
        the caller's thread; it may lag a change being applied)."""
        return self._engine.lora_status()

    def waiting_lora_ids(self) -> set[str]:
        """See ``LLMEngine.waiting_lora_ids`` (read from the caller's thread)."""
        return self._engine.waiting_lora_ids()

    def start(self) -> None:
        """Start the step-loop thread and the adapter loader threads (idempotent)."""
        if self.is_running:
            return
        self._stopping = False
        self._loads = ThreadPoolExecutor(ADAPTER_LOAD_WORKERS, thread_name_prefix="peftserve-adapter-load")
        self._engine.set_adapter_fetcher(self._fetch_in_background)
        self._output.start()
        self._thread = threading.Thread(target=self._loop, name="peftserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still open end with finish_reason 'abort'."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._stop_loads()
        self._run_commands()
        self._output.put(self._engine.finish_all("abort"))
        self._output.stop(timeout)

    def _stop_loads(self) -> None:
        self._engine.set_adapter_fetcher(None)
        if self._loads is not None:
            self._loads.shutdown(wait=False, cancel_futures=True)
            self._loads = None

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (those of its ``params.n`` choices interleaved, each
        naming its ``index``; the stream ends when every choice has finished). Validation
        errors (QueueFull, ValueError) are raised before the first output; leaving the loop
        early aborts the request."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        self._submit(request_id, prompt_token_ids, params, lora_id, stream)
        unfinished = params.n
        try:
            while unfinished:
                out = await stream.queue.get()
                unfinished -= out.finished
                yield out
        finally:
            if unfinished:
                self._abort(request_id)

    async def add_lora(self, lora_id: str, adapter: LoRAAdapter) -> int:
        """Load an adapter between two steps; returns its slot."""
        return await self._call(partial(self._engine.add_lora, lora_id, adapter))

    async def score(self, prompt_ids: list[int], target_ids: list[int], lora_id: str | None = None) -> list[float]:
        """Teacher-forced log p(target_i | prompt, target_<i) under ``lora_id``, from one prefill."""
        out = None
        async for item in self.generate(*_score_request(prompt_ids, target_ids), lora_id):
            out = item
        if out is None or out.prompt_logprobs is None or out.finish_reason == "error":
            raise RuntimeError(f"scoring failed: {out.error if out else 'no output'}")
        return out.prompt_logprobs

    async def remove_lora(self, lora_id: str) -> None:
        """Remove an adapter between two steps (its running requests finish first)."""
        await self._call(partial(self._engine.remove_lora, lora_id))

    async def register_lora(self, lora_id: str, loader: Loader) -> None:
        """Register an adapter between two steps; it is servable as soon as this returns."""
        await self._call(partial(self._engine.register_lora, lora_id, loader))

    async def unregister_lora(self, lora_id: str) -> None:
        """Unregister an adapter between two steps (its queued and running requests finish first)."""
        await self._call(partial(self._engine.unregister_lora, lora_id))

    async def load_lora(self, lora_id: str) -> int:
        """Make an adapter resident; returns its slot. The disk read runs on a loader thread,
        the slot copy between two steps. Raises like ``LLMEngine.load_lora``."""
        job = await self._call(partial(self._admin_fetch_job, lora_id))
        if job is not None:
            result = await asyncio.get_running_loop().run_in_executor(self._loads, job)
            await self._call(partial(self._apply_fetched, result))
            if result.error is not None:
                raise AdapterError(f"adapter {lora_id!r} could not be loaded: {result.error}")
        return await self._call(partial(self._engine.load_lora, lora_id))

    async def unload_lora(self, lora_id: str) -> bool:
        """Move an adapter off the GPU between two steps; see ``LLMEngine.unload_lora``."""
        return await self._call(partial(self._engine.unload_lora, lora_id))

    # -- caller side -------------------------------------------------------------------

    def _submit(self, request_id, prompt_token_ids, params, lora_id, stream: _Stream) -> None:
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            seq = self._engine.make_request(request_id, prompt_token_ids, params, lora_id)
            waiting = self._engine.num_waiting + self._num_pending_adds
            if waiting >= self._engine.max_waiting:
                raise QueueFull(f"{waiting} requests are waiting already")
            self._streams[request_id] = stream
            self._output.add_request(request_id, list(seq.token_ids), params, seq.steps)  # before its outputs
            self._num_pending_adds += 1
            self._commands.append(partial(self._apply_add, seq))
        self._wake.set()

    def _abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        self._output.drop(request_id)
        self._post(partial(self._engine.abort_request, request_id))

    def _post(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the engine thread between two steps."""
        with self._lock:
            self._commands.append(command)
        self._wake.set()

    async def _call(self, fn: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:  # handed to the awaiting caller
                future.set_exception(exc)

        self._post(run)
        if not self.is_running:
            self._run_commands()
        return await asyncio.wrap_future(future)

    # -- engine thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                self._run_commands()
            except Exception:  # a command's own errors go to its caller; this is a bug
                logger.exception("engine command failed")
            if self._stopping:
                return
            if not self._engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            steps = self._engine.stats.steps
            try:
                outputs = self._engine.step_tokens()
            except Exception as exc:  # a broken step must not kill the loop
                logger.exception("engine step failed")
                outputs = self._engine.finish_all("error", f"engine step failed: {exc}")
            self._output.put(outputs)
            if not outputs and self._engine.stats.steps == steps:  # all waiting for adapter loads
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for command in commands:
            command()

    def _admin_fetch_job(self, lora_id: str) -> Callable[[], Fetched] | None:
        return self._engine.adapter_fetch_job(lora_id)

    def _fetch_in_background(self, job: Callable[[], Fetched]) -> None:
        """The tiers' fetcher: run a disk load on a loader thread, apply it between steps."""
        if self._loads is None:  # shutting down: load inline
            self._apply_fetched(job())
            return
        self._loads.submit(self._run_fetch, job)

    def _run_fetch(self, job: Callable[[], Fetched]) -> None:  # on a loader thread
        self._post(partial(self._apply_fetched, job()))

    def _apply_fetched(self, result: Fetched) -> None:
        self._output.put(self._engine.apply_fetched(result))

    def _apply_add(self, seq: Sequence) -> None:
        with self._lock:
            self._num_pending_adds -= 1
        try:
            self._engine.enqueue(seq)
        except ValueError as exc:  # its adapter was removed after validation
            self._output.put([TokenOutput(seq.request_id, [], "error", str(exc))])

    def _stop_in_engine(self, request_ids: list[str]) -> None:
        """Called on the output thread: stop requests a stop string ended (between steps)."""
        self._post(partial(self._stop_requests, request_ids))

    def _stop_requests(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._engine.stop_request(request_id)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Called on the output thread (or inline at shutdown): deliver to the streams."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = defaultdict(list)
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                batches[stream.loop].append((stream.queue, out))
                if out.finished:
                    stream.unfinished -= 1
                    if not stream.unfinished:
                        del self._streams[out.request_id]
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                logger.debug("dropped %d outputs for a closed event loop", len(items))


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
