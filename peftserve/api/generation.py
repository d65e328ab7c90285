"""Talking to AsyncLLMEngine from a request: open a stream, collect it, abort on disconnect.

Aborting is closing: when the engine's ``generate`` iterator is closed or cancelled, the
engine aborts the request and frees its KV blocks. Everything here makes sure that happens
the moment a client goes away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import anyio
from fastapi import Request

from peftserve.engine.engine import NON_FINITE_ERROR, AsyncLLMEngine, QueueFull
from peftserve.engine.outputs import RequestOutput, TokenLogprob
from peftserve.engine.sampling_params import InvalidParameter, SamplingParams
from peftserve.server.errors import (
    APIError,
    ClientDisconnected,
    internal_error,
    invalid_request,
    queue_full,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineFailed(APIError):
    """A request the engine ended with finish reason 'error' (answered as a generic 500).

    ``error`` is the engine's message, for the log and the canary layer, never for the client.
    """

    def __init__(self, request_id: str, error: str | None) -> None:
        base = internal_error(request_id)
        super().__init__(base.status, base.message, base.type, base.param, base.code)
        self.error = error

    @property
    def non_finite(self) -> bool:
        """Whether the model produced non-finite logits (NaN or inf)."""
        return self.error == NON_FINITE_ERROR


class StreamObserver(Protocol):
    """Sees every output of a stream, then its close (the metrics' RequestTracker)."""

    def on_output(self, out: RequestOutput) -> None: ...
    def close(self) -> None: ...


class OutputStream:
    """The engine's output iterator, started (so its errors are known) and closable."""

    def __init__(
        self,
        first: RequestOutput,
        outputs: AsyncIterator[RequestOutput],
        observer: StreamObserver | None = None,
    ) -> None:
        self._first = first
        self._outputs = outputs
        self._observer = observer
        self._observe(first)  # now, so a stream closed unread still records how it began

    @property
    def first(self) -> RequestOutput:
        """The first output (its first token, or the error that ended the request at once)."""
        return self._first

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        yield self._first
        async for out in self._outputs:  # ends after the last choice's final output
            self._observe(out)
            yield out

    def _observe(self, out: RequestOutput) -> None:
        if self._observer is not None:
            self._observer.on_output(out)

    async def aclose(self) -> None:
        """Close the engine iterator (aborting the request if unfinished), even when cancelled."""
        with anyio.CancelScope(shield=True):
            await self._outputs.aclose()  # type: ignore[attr-defined]
        if self._observer is not None:
            self._observer.close()


async def open_stream(
    engine: AsyncLLMEngine,
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    lora_id: str | None,
    observer: StreamObserver | None = None,
) -> OutputStream:
    """Submit the request and wait for its first output; engine refusals become APIErrors."""
    outputs = engine.generate(request_id, prompt_ids, params, lora_id=lora_id)
    try:
        first = await outputs.__anext__()
    except QueueFull:
        raise queue_full() from None
    except InvalidParameter as e:
        raise invalid_request(str(e), e.param) from None
    except ValueError as e:
        raise invalid_request(str(e)) from None
    except StopAsyncIteration:
        logger.error("request %s: engine returned no output", request_id)
        raise internal_error(request_id) from None
    return OutputStream(first, outputs, observer)


def output_error(out: RequestOutput, request_id: str) -> APIError | None:
    """The APIError for an output that ended in an engine error or abort, else None."""
    if out.finish_reason == "error":
        logger.error("request %s failed in the engine: %s", request_id, out.error)
        return EngineFailed(request_id, out.error)
    if out.finish_reason == "abort":
        return APIError(
            503, "The request was aborted by the server.", "server_error", None, "aborted"
        )
    return None


@dataclass
class Generation:
    """One whole non-streamed choice."""

    index: int = 0
    """Its choice index within its engine request."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None
    """Every prompt token's logprob (with ``SamplingParams.prompt_logprobs``)."""

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(out.logprobs)
        if out.prompt_token_logprobs is not None:
            self.prompt_logprobs = out.prompt_token_logprobs
        self.finish_reason = out.finish_reason
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens

    @property
    def mean_logprob(self) -> float:
        """Log-probability per generated token (how ``best_of`` ranks choices)."""
        values = [lp.logprob for lp in self.logprobs or [] if lp.logprob is not None]
        return sum(values) / len(values) if values else float("-inf")


async def collect(stream: OutputStream, request_id: str, n: int = 1) -> list[Generation]:
    """Every output of the stream, as its ``n`` choices (closing the stream in any case)."""
    generations = [Generation(index=i) for i in range(n)]
    try:
        async for out in stream:
            error = output_error(out, request_id)
            if error is not None:
                raise error
            generations[out.index].add(out)
    finally:
        await stream.aclose()
    return generations


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it and raise ClientDisconnected.

    The disconnect is awaited, not polled: one watcher per request waits on the ASGI receive
    channel for ``http.disconnect`` (the body was read already), so waiting costs nothing
    however many requests wait.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    returned = False
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not watcher.done():
            result = task.result()
            returned = True
            return result
        logger.info("request %s: client disconnected, aborting", request.state.request_id)
        raise ClientDisconnected()
    finally:
        for pending in (watcher, task):
            if not pending.done():
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
        if not returned and not task.cancelled() and task.exception() is None:
            await _close_streams(task.result())  # it finished as we gave up: nobody reads it


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the server sends ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _close_streams(result: object) -> None:
    """Close the OutputStreams in an unused result (a stream, or a tuple or list holding
    streams or lists of them)."""
    if isinstance(result, OutputStream):
        await result.aclose()
    elif isinstance(result, (tuple, list)):
        for item in result:
            await _close_streams(item)


async def gather_or_cancel(*work: Awaitable[T]) -> list[T]:
    """The results of ``work``, run concurrently; when one raises, the others are cancelled
    (and awaited) before the error goes on."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
