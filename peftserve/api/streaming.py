"""Engine outputs -> OpenAI response bodies and server-sent-event chunks.

Streams follow OpenAI's chunk shapes: ``text_completion`` chunks for completions; for chat a
first ``chat.completion.chunk`` whose delta carries the role, content deltas, then a chunk with
an empty delta and the finish_reason. With ``stream_options.include_usage`` every chunk has
``"usage": null`` and a last chunk with no choices carries the usage. ``data: [DONE]`` ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
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
        out.top_logprobs.append(dict(item.top))
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


class Chunker(Protocol):
    def start(self) -> list[BaseModel]: ...
    def on_output(self, out: RequestOutput) -> list[BaseModel]: ...
    def usage(self, usage: Usage) -> BaseModel: ...


class CompletionChunker:
    def __init__(self, info: StreamInfo) -> None:
        self.info = info
        self.offset = 0

    def start(self) -> list[BaseModel]:
        return []

    def on_output(self, out: RequestOutput) -> list[BaseModel]:
        if not (out.text or out.finished or out.logprobs):
            return []
        logprobs = None
        if self.info.logprobs:
            logprobs = completion_logprobs(out.logprobs or [], self.offset)
        self.offset += len(out.text)
        finish = out.finish_reason if out.finished else None
        return [
            self._chunk([CompletionChoice(text=out.text, logprobs=logprobs, finish_reason=finish)])
        ]

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

    def start(self) -> list[BaseModel]:
        return [self._chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]

    def on_output(self, out: RequestOutput) -> list[BaseModel]:
        chunks = []
        if out.text or out.logprobs:
            logprobs = chat_logprobs(out.logprobs or []) if self.info.logprobs else None
            choice = ChatChunkChoice(delta=ChatDelta(content=out.text), logprobs=logprobs)
            chunks.append(self._chunk([choice]))
        if out.finished:
            choice = ChatChunkChoice(delta=ChatDelta(), finish_reason=out.finish_reason)
            chunks.append(self._chunk([choice]))
        return chunks

    def usage(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> BaseModel:
        info = self.info
        return ChatCompletionChunk(
            id=info.request_id, created=info.created, model=info.model, choices=choices, usage=usage
        )


def sse_event(chunk: BaseModel, include_usage: bool) -> str:
    return f"data: {chunk.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


async def sse_body(stream: OutputStream, chunker: Chunker, info: StreamInfo) -> AsyncIterator[str]:
    """The event stream of one request; closing or cancelling it aborts the request."""
    try:
        for chunk in chunker.start():
            yield sse_event(chunk, info.include_usage)
        async for event in _output_events(stream, chunker, info):
            yield event
    except Exception:
        logger.exception("request %s: stream failed", info.request_id)
        yield f"data: {_error_json(info.request_id)}\n\n"
    finally:
        await stream.aclose()
    yield DONE


async def _output_events(
    stream: OutputStream, chunker: Chunker, info: StreamInfo
) -> AsyncIterator[str]:
    last: RequestOutput | None = None
    async for out in stream:
        error = output_error(out, info.request_id)
        if error is not None:
            yield f"data: {_json(error.body())}\n\n"
            return
        for chunk in chunker.on_output(out):
            yield sse_event(chunk, info.include_usage)
        last = out
    if info.include_usage and last is not None:
        usage = Usage.of(last.prompt_tokens, last.completion_tokens)
        yield sse_event(chunker.usage(usage), True)


def _json(body: dict) -> str:
    return json.dumps(body)


def _error_json(request_id: str) -> str:
    return _json(internal_error(request_id).body())


class SSEResponse(StreamingResponse):
    """A server-sent-event stream whose body iterator is always closed (aborting the request)."""

    media_type = "text/event-stream"

    def __init__(
        self, body: AsyncIterator[str], headers: dict[str, str] | None = None, stream: OutputStream | None = None
    ) -> None:
        fixed = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(body, headers={**fixed, **(headers or {})})
        self.stream = stream
        """The engine stream behind ``body``: closed here too, as a body iterator closed before
        it started never runs its own ``finally``."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.stream is not None:
                await self.stream.aclose()  # shielded; closing twice is harmless

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
