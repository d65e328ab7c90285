"""Token outputs -> request outputs: detokenization, stop strings, logprob texts.

The step loop (``LLMEngine.step_tokens``) produces token ids only. ``OutputProcessor``
keeps the text side of every request and assembles the ``RequestOutput`` increments the
callers see. ``LLMEngine.step`` runs it inline; ``AsyncLLMEngine`` runs it on its output
thread (``OutputThread``), so neither the engine thread nor the asyncio event loop spends
time in the tokenizer.

A stop string is found here, after the engine produced the token that completed it. The
processor then ends the request's output (that token is the last one delivered) and
reports the request id, so the caller stops it in the engine; tokens the engine generated
for it meanwhile are dropped, so the output is exactly what an inline check would give.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from transformers import PreTrainedTokenizerBase

from peftserve.engine.detokenizer import Detokenizer, DetokState
from peftserve.engine.outputs import (
    RawLogprob,
    RequestOutput,
    StepRecord,
    TokenLogprob,
    TokenOutput,
    step_share,
)
from peftserve.engine.sampling_params import SamplingParams
from peftserve.engine.sequence import choice_id

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Request:
    """One choice of a request (the request itself when it has one)."""

    detok: DetokState
    want_logprobs: bool
    prompt_tokens: int
    request_id: str
    index: int = 0
    prompt_ids: list[int] | None = None
    """Kept when the request wants its prompt's logprobs with their texts."""
    completion_tokens: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    steps: list[StepRecord] | None = None
    """The engine's step records of the request (``Sequence.steps``), summed into the last
    output's ``batch``; None: not tracked."""


class OutputProcessor:
    """The text side of every open request (not thread-safe: one thread calls it)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.detokenizer = Detokenizer(tokenizer)
        self._requests: dict[str, _Request] = {}
        """Keyed by the engine's id of each choice (``choice_id``)."""
        self._choices: dict[str, list[str]] = {}
        """Request id -> its choices' ids, for requests with several."""

    def __len__(self) -> int:
        return len(self._requests)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        steps: list[StepRecord] | None = None,
    ) -> None:
        """Start tracking a request (each of its ``params.n`` choices); must come before its
        first token output. ``steps``: the engine's list of the request's step records, for the
        last output's ``batch`` (choice 0's: the other choices' outputs carry none)."""
        prompt_ids = list(prompt_token_ids) if params.prompt_logprobs is not None else None
        choices = [choice_id(request_id, i) for i in range(params.n)]
        for index, choice in enumerate(choices):
            self._requests[choice] = _Request(
                detok=self.detokenizer.start(prompt_token_ids, params.stop),
                want_logprobs=params.logprobs is not None,
                prompt_tokens=len(prompt_token_ids),
                request_id=request_id,
                index=index,
                prompt_ids=prompt_ids,
                steps=steps if index == 0 else None,
            )
        if params.n > 1:
            self._choices[request_id] = choices

    def drop(self, request_id: str) -> None:
        """Forget a request whose caller went away (its later outputs are ignored)."""
        for choice in self._choices.pop(request_id, [request_id]):
            self._requests.pop(choice, None)

    def process(self, outputs: list[TokenOutput]) -> tuple[list[RequestOutput], list[str]]:
        """The request outputs of ``outputs``, and the ids of requests a stop string ended
        that the engine still runs (the caller stops them there)."""
        results: list[RequestOutput] = []
        stopped: list[str] = []
        pending = outputs
        while pending:  # rounds holding each request once (several steps may arrive together)
            batch: list[TokenOutput] = []
            later: list[TokenOutput] = []
            seen: set[str] = set()
            for out in pending:
                (later if out.request_id in seen else batch).append(out)
                seen.add(out.request_id)
            self._process_round(batch, results, stopped)
            pending = later
        return results, stopped

    def _process_round(
        self, outputs: list[TokenOutput], results: list[RequestOutput], stopped: list[str]
    ) -> None:
        live = [
            (out, req) for out in outputs if (req := self._requests.get(out.request_id)) is not None
        ]
        firsts = [(req.detok, out.token_ids[0]) for out, req in live if out.token_ids]
        try:  # the first new token of every request in one batched decode
            hits = iter(self.detokenizer.update_many(firsts))
        except Exception:  # a tokenizer failure: retry one by one below, to end only its request
            logger.exception("batched detokenization failed")
            hits = None
        for out, req in live:
            try:
                first = None if hits is None or not out.token_ids else next(hits)
                result = self._process_one(out, req, first)
            except Exception as exc:  # a tokenizer failure ends this request, not the others
                logger.exception("output processing of %s failed", out.request_id)
                result = _failed(out.request_id, req, f"output processing failed: {exc}")
            results.append(result)
            if result.finished:
                del self._requests[out.request_id]
                self._forget_choice(req.request_id, out.request_id)
                if out.finish_reason is None:
                    stopped.append(out.request_id)

    def _forget_choice(self, request_id: str, choice: str) -> None:
        choices = self._choices.get(request_id)
        if choices is not None:
            choices.remove(choice)
            if not choices:
                del self._choices[request_id]

    def _process_one(
        self, out: TokenOutput, req: _Request, first_stopped: bool | None
    ) -> RequestOutput:
        """``first_stopped``: the first token is detokenized already (did it stop the text?)."""
        detok = self.detokenizer
        emitted = 0
        reason = out.finish_reason
        for i, token in enumerate(out.token_ids):
            req.completion_tokens += 1
            emitted += 1
            if req.want_logprobs and out.logprobs is not None:
                req.pending_logprobs.append(self._token_logprob(token, out.logprobs[i]))
            hit = (
                first_stopped
                if i == 0 and first_stopped is not None
                else detok.update(req.detok, token)
            )
            if hit:
                reason = "stop"
                break
        finished = reason is not None
        logprobs = None
        if req.want_logprobs:
            logprobs, req.pending_logprobs = req.pending_logprobs, []
        raw_prompt = out.prompt_logprobs
        return RequestOutput(
            request_id=req.request_id,
            text=detok.take_text(req.detok, final=finished),
            token_ids=out.token_ids[:emitted] if emitted < len(out.token_ids) else out.token_ids,
            logprobs=logprobs,
            finished=finished,
            finish_reason=reason,
            prompt_tokens=req.prompt_tokens,
            completion_tokens=req.completion_tokens,
            error=out.error if finished else None,
            prompt_logprobs=None if raw_prompt is None else [lp for lp, _, _ in raw_prompt],
            index=req.index,
            prompt_token_logprobs=self._prompt_token_logprobs(req, raw_prompt),
            batch=step_share(req.steps) if finished and req.steps is not None else None,
        )

    def _prompt_token_logprobs(
        self, req: _Request, raw: list[RawLogprob] | None
    ) -> list[TokenLogprob] | None:
        """Every prompt token with its text; ``raw`` holds the entries of the second on."""
        prompt = req.prompt_ids
        if raw is None or prompt is None or len(raw) != len(prompt) - 1:
            return None
        first = TokenLogprob(self.detokenizer.token_text(prompt[0]), None)
        return [
            first,
            *(self._token_logprob(t, item) for t, item in zip(prompt[1:], raw, strict=True)),
        ]

    def _token_logprob(self, token: int, raw: RawLogprob) -> TokenLogprob:
        value, top_ids, top_lps = raw
        text = self.detokenizer.token_text
        return TokenLogprob(
            text(token), value, {text(i): lp for i, lp in zip(top_ids, top_lps, strict=True)}
        )


def _failed(request_id: str, req: _Request, error: str) -> RequestOutput:
    return RequestOutput(
        request_id=req.request_id, text="", token_ids=[], logprobs=None, finished=True, finish_reason="error",
        prompt_tokens=req.prompt_tokens, completion_tokens=req.completion_tokens, error=error, index=req.index,
    )  # fmt: skip


_STOP = object()


class OutputThread:
    """Runs an ``OutputProcessor`` on its own thread.

    Items are applied in the order they are put: ``add`` (a new request), ``drop`` (its
    caller went away) and batches of token outputs from the engine thread. The request
    outputs go to ``deliver``; the ids of requests a stop string ended go to ``stop``
    (which must hand them to the engine thread). Both are called on this thread.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        deliver: Callable[[list[RequestOutput]], None],
        stop: Callable[[list[str]], None],
    ) -> None:
        self.processor = OutputProcessor(tokenizer)
        self._deliver = deliver
        self._stop = stop
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        steps: list[StepRecord] | None = None,
    ) -> None:
        self._queue.put(
            partial(self.processor.add_request, request_id, prompt_token_ids, params, steps)
        )

    def drop(self, request_id: str) -> None:
        self._queue.put(partial(self.processor.drop, request_id))

    def put(self, outputs: list[TokenOutput]) -> None:
        """Hand over one step's token outputs (from the engine thread)."""
        if outputs:
            self._queue.put(outputs)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peftserve-output", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Apply everything put so far, then end the thread (inline when it never started)."""
        if self._thread is None:
            self._drain(block=False)
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        running = True
        while running:
            try:
                running = self._drain(block=True)
            except Exception:  # a delivery bug must not end the thread: log it, go on
                logger.exception("output thread failed to apply an item")

    def _drain(self, block: bool) -> bool:
        """Apply the queued items (waiting for one when ``block``); False after the stop mark."""
        items = []
        try:
            items.append(self._queue.get(block=block))
            while True:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        outputs: list[TokenOutput] = []
        running = True
        for item in items:
            if item is _STOP:
                running = False
            elif isinstance(item, list):
                outputs.extend(item)
            else:  # add / drop: apply in order with the outputs around it
                self._flush(outputs)
                outputs = []
                item()
        self._flush(outputs)
        return running

    def _flush(self, outputs: list[TokenOutput]) -> None:
        if not outputs:
            return
        results, stopped = self.processor.process(outputs)
        if stopped:
            self._stop(stopped)
        self._deliver(results)
