"""OpenAI request and response bodies (pydantic).

Requests ignore unknown fields (as vLLM does). Fields we know but cannot honour (n > 1,
echo, penalties, ...) are rejected with a 400 naming them rather than silently dropped;
range checks live in ``SamplingParams`` so there is one source for them. ``_doc`` writes
those ranges into the OpenAPI document as well (``/openapi.json`` tells a client what is
accepted) without validating them a second time.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _doc(default: Any = ..., **schema: Any) -> Any:
    """A field whose JSON schema states ``schema`` (checked by the server elsewhere)."""
    return Field(default, json_schema_extra=schema)


_TOP = {"minimum": 0, "maximum": 20}


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: str = _doc(examples=["base"])
    """The base model, a task, or a pinned ``task@version`` (GET /v1/models lists them)."""
    temperature: float | None = _doc(None, minimum=0, maximum=2)
    top_p: float | None = _doc(None, exclusiveMinimum=0, maximum=1)
    top_k: int | None = _doc(None, minimum=-1)
    """Extension (vLLM): keep the k most likely tokens; -1 or 0 keeps all."""
    seed: int | None = _doc(None, minimum=-(2**63), maximum=2**64 - 1)
    stop: str | list[str] | None = _doc(None, minLength=1, maxItems=4, items={"minLength": 1})
    """Up to 4 non-empty strings."""
    n: int | None = _doc(1, minimum=1, maximum=1)
    """Only 1 (one choice per request)."""
    user: str | None = None
    metadata: dict[str, str] | None = None
    """Labels of the request (OpenAI: up to 16 string pairs); canary rollouts judge each value as a
    segment, so a regression confined to one label's users is caught."""
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    """Extension (vLLM): keep generating past the end-of-sequence token."""
    presence_penalty: float | None = _doc(None, minimum=0, maximum=0)
    """Not supported: only 0."""
    frequency_penalty: float | None = _doc(None, minimum=0, maximum=0)
    """Not supported: only 0."""
    logit_bias: dict[str, float] | None = _doc(None, maxProperties=0)
    """Not supported: only ``{}``."""

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = _doc(minLength=1, minItems=1)
    """One prompt: a string, token ids, or a list holding one of them."""
    max_tokens: int | None = _doc(16, minimum=1)
    logprobs: int | None = _doc(None, **_TOP)
    echo: bool | None = _doc(False, enum=[False, None])
    """Not supported: only false."""
    best_of: int | None = _doc(None, minimum=1, maximum=1)
    """Not supported: only 1."""
    suffix: str | None = _doc(None, maxLength=0)
    """Not supported: only empty."""


class TextPart(_Request):
    type: str = _doc(enum=["text"])
    """Only text parts."""
    text: str | None = None


class ChatMessage(_Request):
    role: str = _doc(enum=["system", "developer", "user", "assistant", "tool"])
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = _doc(minItems=1)
    max_tokens: int | None = _doc(None, minimum=1)
    max_completion_tokens: int | None = _doc(None, minimum=1)
    logprobs: bool | None = False
    top_logprobs: int | None = _doc(None, **_TOP)
    """Needs ``logprobs: true``."""


# ---- responses ----------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    """Serialized without its unset fields, as OpenAI does (``{}`` on the final chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "peftserve"
    root: str
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel, include_usage: bool = True) -> dict[str, Any]:
    """JSON-ready dict; ``usage`` is left out of stream chunks unless the client asked for it."""
    return model.model_dump(exclude={"usage"} if not include_usage else None)


# ---- errors and other answers (documented in /openapi.json) -------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    """The request field at fault (``messages[0].content``), when one is."""
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a user's score of a completion (read by the route itself)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    """The completion's id (``cmpl-...`` or ``chatcmpl-...``)."""
    score: bool | Annotated[float, Field(ge=0.0, le=1.0)]
    """true, false or a number in [0, 1]."""


class FeedbackResponse(BaseModel):
    object: Literal["feedback"] = "feedback"
    id: str
    score: float


class HealthResponse(BaseModel):
    status: str
    """``ok`` while the engine's step loop runs (200), else ``engine stopped`` (503)."""
    model: str
    adapters: list[str]
    engine: dict[str, int | float | str | bool | None]
