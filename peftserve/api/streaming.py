"""Engine outputs -> OpenAI response bodies and server-sent-event chunks.

Streams follow OpenAI's chunk shapes: ``text_completion`` chunks for completions; for chat a
first ``chat.completion.chunk`` per choice whose delta carries the role, content deltas, then a
chunk with an empty delta and the finish_reason. A request with several prompts or choices
interleaves its choices' chunks, each naming its ``index``. With ``stream_options.include_usage``
every chunk has ``"usage": null`` (vLLM's ``continuous_usage_stats``: the usage so far) and a
last chunk with no choices carries the usage of all choices. ``data: [DONE]`` ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from peftserve.api.generation import OutputStream, output_error
from peftserve.api.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TopLogprob,
    Usage,
)
from peftserve.engine.outputs import RequestOutput, TokenLogprob
from peftserve.server.errors import internal_error

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def completion_logprobs(items: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """Legacy completions logprobs; ``offset`` is the text length before these tokens."""
    out = CompletionLogprobs()
    for item in items:
        out.tokens.append(item.token)
        out.token_logprobs.append(item.logprob)
        out.top_logprobs.append(dict(item.top) if item.logprob is not None else None)
        out.text_offset.append(offset)
        offset += len(item.token)
    return out


def chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    content = [
        ChatTokenLogprob(
            token=item.token,
            logprob=item.logprob,
            bytes=list(item.token.encode()),
            top_logprobs=[
                TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                for t, lp in item.top.items()
            ],
        )
        for item in items
    ]
    return ChatLogprobs(content=content)


@dataclass
class StreamInfo:
    request_id: str
    model: str
    created: int
    include_usage: bool
    logprobs: bool
    n: int = 1
    """Choices per prompt: choice ``i`` of prompt ``p`` is index ``p * n + i``."""
    echo: list[str] | None = None
    """Completions ``echo``: each prompt's text, sent before its choices' first text."""
    prompt_only: bool = False
    """``echo`` with ``max_tokens: 0``: the generated token is not sent."""
    continuous_usage: bool = False
    """Every chunk carries the usage so far (with ``include_usage``)."""

    def index(self, prompt: int, out: RequestOutput) -> int:
        return prompt * self.n + out.index


class Chunker(Protocol):
    def start(self, indices: range = range(1)) -> list[BaseModel]: ...
    def on_output(self, out: RequestOutput, prompt: int = 0) -> list[BaseModel]: ...
    def usage(self, usage: Usage) -> BaseModel: ...


class CompletionChunker:
    def __init__(self, info: StreamInfo) -> None:
        self.info = info
        self.offsets: dict[int, int] = {}
        """Text sent so far per choice index (the logprobs' text offsets)."""

    def start(self, indices: range = range(1)) -> list[BaseModel]:
        return []

    def on_output(self, out: RequestOutput, prompt: int = 0) -> list[BaseModel]:
        info = self.info
        index = info.index(prompt, out)
        first = index not in self.offsets
        text, items = out.text, list(out.logprobs or [])
        if info.prompt_only:
            text, items = "", []
        if first and info.echo is not None:
            text = info.echo[prompt] + text
            items = list(out.prompt_token_logprobs or []) + items
        if not (text or out.finished or items):
            return []
        offset = self.offsets.get(index, 0)
        logprobs = completion_logprobs(items, offset) if info.logprobs else None
        self.offsets[index] = offset + len(text)
        finish = out.finish_reason if out.finished else None
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
        return [self._chunk([choice])]

    def usage(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> BaseModel:
        info = self.info
        return CompletionResponse(
            id=info.request_id, created=info.created, model=info.model, choices=choices, usage=usage
        )


class ChatChunker:
    def __init__(self, info: StreamInfo) -> None:
        self.info = info

    def start(self, indices: range = range(1)) -> list[BaseModel]:
        delta = ChatDelta(role="assistant", content="")
        return [self._chunk([ChatChunkChoice(index=i, delta=delta)]) for i in indices]

    def on_output(self, out: RequestOutput, prompt: int = 0) -> list[BaseModel]:
        index = self.info.index(prompt, out)
        chunks = []
        if out.text or out.logprobs:
            logprobs = chat_logprobs(out.logprobs or []) if self.info.logprobs else None
            delta = ChatDelta(content=out.text)
            chunks.append(self._chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs)]))
        if out.finished:
            choice = ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=out.finish_reason)
            chunks.append(self._chunk([choice]))
        return chunks

    def usage(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> BaseModel:
        info = self.info
        return ChatCompletionChunk(
            id=info.request_id, created=info.created, model=info.model, choices=choices, usage=usage
        )


class UsageCounter:
    """Tokens of a request's prompts and choices so far (each output carries its choice's)."""

    def __init__(self, prompt_only: bool = False) -> None:
        self.prompt_only = prompt_only
        self._prompts: dict[int, int] = {}
        self._completions: dict[tuple[int, int], int] = {}

    def start(self, prompt: int, prompt_tokens: int) -> None:
        self._prompts[prompt] = prompt_tokens

    def add(self, prompt: int, out: RequestOutput) -> None:
        self._prompts[prompt] = out.prompt_tokens
        self._completions[(prompt, out.index)] = 0 if self.prompt_only else out.completion_tokens

    @property
    def usage(self) -> Usage:
        return Usage.of(sum(self._prompts.values()), sum(self._completions.values()))


def _event(chunk: BaseModel, info: StreamInfo, counter: UsageCounter) -> str:
    """A chunk's event; with vLLM's ``continuous_usage_stats`` it carries the usage so far."""
    if info.continuous_usage and info.include_usage:
        chunk.usage = counter.usage  # type: ignore[attr-defined]
    return sse_event(chunk, info.include_usage)


def sse_event(chunk: BaseModel, include_usage: bool) -> str:
    return f"data: {chunk.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


async def sse_body(
    streams: list[OutputStream], chunker: Chunker, info: StreamInfo
) -> AsyncIterator[str]:
    """The event stream of one request (its prompts' engine streams, merged); closing or
    cancelling it aborts every one."""
    counter = UsageCounter(info.prompt_only)
    for i, stream in enumerate(streams):
        counter.start(i, stream.first.prompt_tokens)
    try:
        for chunk in chunker.start(range(len(streams) * info.n)):
            yield _event(chunk, info, counter)
        async for event in _output_events(streams, chunker, info, counter):
            yield event
    except Exception:
        logger.exception("request %s: stream failed", info.request_id)
        yield f"data: {_error_json(info.request_id)}\n\n"
    finally:
        for stream in streams:
            await stream.aclose()
    yield DONE


async def _output_events(
    streams: list[OutputStream], chunker: Chunker, info: StreamInfo, counter: UsageCounter
) -> AsyncIterator[str]:
    async with aclosing(merged(streams)) as outputs:
        async for prompt, out in outputs:
            error = output_error(out, info.request_id)
            if error is not None:
                yield f"data: {_json(error.body())}\n\n"
                return
            counter.add(prompt, out)
            for chunk in chunker.on_output(out, prompt):
                yield _event(chunk, info, counter)
    if info.include_usage:
        yield sse_event(chunker.usage(counter.usage), True)


async def merged(streams: list[OutputStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of ``streams`` as they come, each with its stream's position."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: OutputStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as exc:  # handed to the reader
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        ended = 0
        while ended < len(streams):
            i, item = await queue.get()
            if item is None:
                ended += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _json(body: dict) -> str:
    return json.dumps(body)


def _error_json(request_id: str) -> str:
    return _json(internal_error(request_id).body())


class SSEResponse(StreamingResponse):
    """A server-sent-event stream whose body iterator is always closed (aborting the request)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        body: AsyncIterator[str],
        headers: dict[str, str] | None = None,
        streams: list[OutputStream] | None = None,
    ) -> None:
        fixed = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(body, headers={**fixed, **(headers or {})})
        self.streams = streams or []
        """The engine streams behind ``body``: closed here too, as a body iterator closed before
        it started never runs its own ``finally``."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self.streams:
                await stream.aclose()  # shielded; closing twice is harmless

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
