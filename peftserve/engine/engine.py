"""The step loop: schedule -> run -> sample -> postprocess; and its asyncio front.

``LLMEngine`` is single-threaded: call ``step()`` until ``has_unfinished_requests()`` is
False. ``AsyncLLMEngine`` runs that loop in one background thread; requests, aborts and
adapter loads reach it through a command list applied between steps, and outputs travel
back to each request's asyncio queue with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from peftserve.config import EngineConfig
from peftserve.engine.block_manager import BlockManager
from peftserve.engine.detokenizer import Detokenizer
from peftserve.engine.model_runner import ModelRunner
from peftserve.engine.outputs import RequestOutput, TokenLogprob
from peftserve.engine.sampler import Sampler
from peftserve.engine.sampling_params import InvalidParameter, SamplingParams
from peftserve.engine.scheduler import Scheduler, SchedulerOutput
from peftserve.engine.sequence import Sequence

if TYPE_CHECKING:
    from peftserve.lora.peft_adapter import LoRAAdapter

logger = logging.getLogger(__name__)

NON_FINITE_ERROR = "the model produced non-finite logits (NaN or inf)"


class QueueFull(Exception):
    """The waiting queue holds ``SchedulerConfig.max_waiting`` requests; try again later."""


class UnknownAdapter(ValueError):
    """The request names an adapter that is not loaded (or is being removed)."""


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


class LLMEngine:
    """Base model + LoRA slots + paged KV cache + continuous-batching scheduler."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        generator = torch.Generator(device=self.device).manual_seed(config.model.seed)
        self.sampler = Sampler(generator)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.eos_token_ids = _eos_token_ids(self.runner)
        self._stats = EngineStats(kv_blocks_total=self.block_manager.num_blocks)
        self._lora_users: dict[str, int] = defaultdict(int)
        self._draining: set[str] = set()

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
        )

    # -- adapters --------------------------------------------------------------------

    def add_lora(self, lora_id: str, adapter: LoRAAdapter) -> int:
        """Load ``adapter`` into a free slot (or reload an idle one in place); return the slot."""
        if lora_id in self._draining or self._lora_users.get(lora_id):
            raise ValueError(f"adapter {lora_id!r} is in use by running requests; remove it and wait")
        slot = self.lora_manager.load(lora_id, adapter)
        logger.info("adapter %s loaded in slot %d", lora_id, slot)
        return slot

    def remove_lora(self, lora_id: str) -> None:
        """Refuse new requests for ``lora_id`` at once; free its slot when its last request ends."""
        if lora_id in self._draining or not self.lora_manager.is_loaded(lora_id):
            raise UnknownAdapter(f"adapter {lora_id!r} is not loaded")
        self._draining.add(lora_id)
        self._unload_if_idle(lora_id)

    def _unload_if_idle(self, lora_id: str) -> None:
        if lora_id in self._draining and not self._lora_users.get(lora_id):
            self._draining.discard(lora_id)
            self._lora_users.pop(lora_id, None)
            self.lora_manager.unload(lora_id)
            logger.info("adapter %s unloaded", lora_id)

    def _slot_for(self, lora_id: str | None) -> int:
        if lora_id is None:
            return 0
        if lora_id in self._draining or not self.lora_manager.is_loaded(lora_id):
            raise UnknownAdapter(f"adapter {lora_id!r} is not loaded")
        return self.lora_manager.slot_of(lora_id)

    # -- requests --------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora_id: str | None = None,
    ) -> None:
        """Queue a request; raises QueueFull, InvalidParameter or UnknownAdapter (ValueErrors)."""
        seq = self._new_sequence(request_id, prompt_token_ids, params, lora_id)
        if self.num_waiting >= self.config.scheduler.max_waiting:
            raise QueueFull(f"{self.num_waiting} requests are waiting already")
        self._enqueue(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def _new_sequence(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lora_id: str | None
    ) -> Sequence:
        """Validate a request (touches no engine state) and build its sequence."""
        if self.scheduler.get(request_id) is not None:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = list(prompt_token_ids)
        self._check_prompt(prompt, params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return Sequence(
            request_id=request_id,
            token_ids=prompt,
            num_prompt_tokens=len(prompt),
            params=params,
            lora_id=lora_id,
            slot=self._slot_for(lora_id),
            generator=generator,
        )

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

    def _enqueue(self, seq: Sequence) -> None:
        seq.slot = self._slot_for(seq.lora_id)  # again: the adapter may have gone since
        self.scheduler.add(seq)
        self.detokenizer.start(seq)
        if seq.lora_id is not None:
            self._lora_users[seq.lora_id] += 1

    def abort_request(self, request_id: str) -> None:
        """Drop a request and free its KV blocks (no output; unknown ids are ignored)."""
        seq = self.scheduler.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")

    def finish_all(self, reason: str, error: str | None = None) -> list[RequestOutput]:
        """End every unfinished request with ``reason``; their final outputs."""
        seqs = list(self.scheduler.running) + list(self.scheduler.waiting)
        return [self._finish_output(seq, [], reason, error) for seq in seqs]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the step ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run the packed batch, sample, postprocess."""
        return self._step()[0]

    def step_with_logits(self) -> tuple[list[RequestOutput], dict[str, torch.Tensor]]:
        """``step()``, plus the fp32 logits [V] each sampled request's token was drawn from."""
        outputs, logits, seqs = self._step()
        return outputs, {seq.request_id: logits[i] for i, seq in enumerate(seqs)}

    @torch.inference_mode()
    def _step(self) -> tuple[list[RequestOutput], torch.Tensor, list[Sequence]]:
        sched = self.scheduler.schedule()
        if not sched.seqs:
            return [], torch.empty(0), []
        logits, seqs = self.runner.execute(sched)  # [S, V]
        for seq, n in zip(sched.seqs, sched.num_tokens, strict=True):
            seq.num_computed_tokens += n
        self._record(sched)
        if not seqs:
            return [], logits, seqs
        sampled = self.sampler(logits, seqs)
        outputs = [
            self._postprocess(seq, tok, ok, lp)
            for seq, tok, ok, lp in zip(seqs, sampled.token_ids, sampled.finite, sampled.logprobs, strict=True)
        ]
        return outputs, logits, seqs

    def _record(self, sched: SchedulerOutput) -> None:
        stats = self._stats
        stats.steps += 1
        stats.tokens += sched.total_tokens
        stats.num_preemptions += sched.num_preempted
        slots = {seq.slot for seq in sched.seqs}
        stats.max_loras_in_step = max(stats.max_loras_in_step, len(slots - {0}))
        stats.mixed_lora_steps += len(slots) >= 2

    def _postprocess(
        self, seq: Sequence, token: int, finite: bool, logprob: tuple[float, list[int], list[float]] | None
    ) -> RequestOutput:
        if not finite:
            self.runner.zero_blocks(seq.block_table)  # its KV may hold NaN: never let it leak
            return self._finish_output(seq, [], "error", NON_FINITE_ERROR)
        seq.token_ids.append(token)
        self._stats.generated_tokens += 1
        if logprob is not None:
            seq.pending_logprobs.append(self._token_logprob(token, logprob))
        reason = self._stop_reason(seq, token)
        if self.detokenizer.update(seq):
            reason = "stop"
        if reason is not None:
            return self._finish_output(seq, [token], reason)
        return self._output(seq, [token])

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if seq.num_generated >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _token_logprob(self, token: int, logprob: tuple[float, list[int], list[float]]) -> TokenLogprob:
        value, top_ids, top_lps = logprob
        text = self.detokenizer.token_text
        return TokenLogprob(text(token), value, {text(i): lp for i, lp in zip(top_ids, top_lps, strict=True)})

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.finish_reason = reason
        seq.error = error
        self.scheduler.finish(seq)
        self._stats.requests_finished += 1
        if seq.lora_id is not None:
            self._lora_users[seq.lora_id] -= 1
            self._unload_if_idle(seq.lora_id)

    def _finish_output(self, seq: Sequence, new_ids: list[int], reason: str, error: str | None = None) -> RequestOutput:
        self._finish(seq, reason, error)
        return self._output(seq, new_ids)

    def _output(self, seq: Sequence, new_ids: list[int]) -> RequestOutput:
        finished = seq.finish_reason is not None
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        seq.num_emitted_tokens += len(new_ids)
        return RequestOutput(
            request_id=seq.request_id,
            text=self.detokenizer.take_text(seq, final=finished),
            token_ids=new_ids,
            logprobs=logprobs,
            finished=finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_generated,
            error=seq.error,
        )


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


class AsyncLLMEngine:
    """Runs an ``LLMEngine`` step loop in one background thread, for asyncio callers."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._commands: list[Callable[[], None]] = []
        self._streams: dict[str, _Stream] = {}
        self._num_pending_adds = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def engine(self) -> LLMEngine:
        return self._engine

    @property
    def stats(self) -> EngineStats:
        return self._engine.stats

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the step-loop thread (idempotent)."""
        if self.is_running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="peftserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still open end with finish_reason 'abort'."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._run_commands()
        self._publish(self._engine.finish_all("abort"))

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Validation errors (QueueFull, ValueError) are raised
        before the first output; leaving the loop early aborts the request."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._submit(request_id, prompt_token_ids, params, lora_id, stream)
        finished = False
        try:
            while not finished:
                out = await stream.queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._abort(request_id)

    async def add_lora(self, lora_id: str, adapter: LoRAAdapter) -> int:
        """Load an adapter between two steps; returns its slot."""
        return await self._call(partial(self._engine.add_lora, lora_id, adapter))

    async def remove_lora(self, lora_id: str) -> None:
        """Remove an adapter between two steps (its running requests finish first)."""
        await self._call(partial(self._engine.remove_lora, lora_id))

    # -- caller side -------------------------------------------------------------------

    def _submit(self, request_id, prompt_token_ids, params, lora_id, stream: _Stream) -> None:
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            seq = self._engine._new_sequence(request_id, prompt_token_ids, params, lora_id)
            waiting = self._engine.num_waiting + self._num_pending_adds
            if waiting >= self._engine.config.scheduler.max_waiting:
                raise QueueFull(f"{waiting} requests are waiting already")
            self._streams[request_id] = stream
            self._num_pending_adds += 1
            self._commands.append(partial(self._apply_add, seq))
        self._wake.set()

    def _abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._commands.append(partial(self._engine.abort_request, request_id))
        self._wake.set()

    async def _call(self, fn: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:  # handed to the awaiting caller
                future.set_exception(exc)

        with self._lock:
            self._commands.append(run)
        self._wake.set()
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
            try:
                outputs = self._engine.step()
            except Exception as exc:  # a broken step must not kill the loop
                logger.exception("engine step failed")
                outputs = self._engine.finish_all("error", f"engine step failed: {exc}")
            self._publish(outputs)

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for command in commands:
            command()

    def _apply_add(self, seq: Sequence) -> None:
        with self._lock:
            self._num_pending_adds -= 1
        try:
            self._engine._enqueue(seq)
        except ValueError as exc:  # its adapter was removed after validation
            seq.finish_reason, seq.error = "error", str(exc)
            self._publish([self._engine._output(seq, [])])

    def _publish(self, outputs: list[RequestOutput]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = defaultdict(list)
        with self._lock:
            for out in outputs:
                stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
                if stream is not None:
                    batches[stream.loop].append((stream.queue, out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                logger.debug("dropped %d outputs for a closed event loop", len(items))


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
