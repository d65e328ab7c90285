"""OpenAI request and response bodies (pydantic).

Requests ignore unknown fields (as vLLM does). Fields we know but cannot honour (``tools``,
``response_format`` beyond text, ``functions``, audio, vLLM's guided decoding, ...) are
declared here and rejected with a 400 naming them (``peftserve.api.prompts.reject_unsupported``)
rather than silently dropped; range checks live in ``SamplingParams`` so there is one source
for them. ``_doc`` writes those ranges and refusals into the OpenAPI document as well
(``/openapi.json`` tells a client what is accepted) without validating them a second time.
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
_NULL = {"type": "null"}
"""Only null (or absent) is accepted: a value is a 400 naming the field."""
_PENALTY = {"minimum": -2, "maximum": 2}


class StreamOptions(_Request):
    include_usage: bool = False
    """A last chunk, without choices, carries the request's usage."""
    continuous_usage_stats: bool = False
    """Extension (vLLM): every chunk carries the usage so far (with ``include_usage``)."""


class SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: str = _doc(examples=["base"])
    """The base model, a task, or a pinned ``task@version`` (GET /v1/models lists them)."""
    temperature: float | None = _doc(None, minimum=0, maximum=2)
    top_p: float | None = _doc(None, exclusiveMinimum=0, maximum=1)
    top_k: int | None = _doc(None, minimum=-1)
    """Extension (vLLM): keep the k most likely tokens; -1 or 0 keeps all."""
    seed: int | None = _doc(None, minimum=-(2**63), maximum=2**64 - 1)
    """Same seed, prompt and parameters give the same output; with n > 1 each choice draws
    its own tokens (choice 0 those of n = 1)."""
    stop: str | list[str] | None = _doc(None, minLength=1, maxItems=4, items={"minLength": 1})
    """Up to 4 non-empty strings."""
    n: int | None = _doc(1, minimum=1)
    """Choices per prompt, sharing the prompt's prefill; at most the server's ``max_num_seqs``."""
    user: str | None = None
    metadata: dict[str, str] | None = None
    """Labels of the request (OpenAI: up to 16 string pairs); canary rollouts judge each value as a
    segment, so a regression confined to one label's users is caught."""
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    """Only with ``stream: true``."""
    ignore_eos: bool = False
    """Extension (vLLM): keep generating past the end-of-sequence token."""
    presence_penalty: float | None = _doc(None, **_PENALTY)
    """Subtracted from the logit of every token generated so far."""
    frequency_penalty: float | None = _doc(None, **_PENALTY)
    """Subtracted from a token's logit once per time it was generated."""
    repetition_penalty: float | None = _doc(None, exclusiveMinimum=0)
    """Extension (vLLM): divides the positive and multiplies the negative logits of the tokens
    in the prompt or generated so far (1: off)."""
    logit_bias: dict[str, float] | None = _doc(
        None,
        propertyNames={"pattern": "^[0-9]+$"},
        additionalProperties={"minimum": -100, "maximum": 100},
    )
    """Token id (decimal digits, below the vocabulary size) -> a bias in -100..100 added to its
    logit."""
    # Not supported: a 400 names them when set (see ``prompts.reject_unsupported``).
    response_format: dict[str, Any] | None = _doc(None, properties={"type": {"enum": ["text"]}})
    """Not supported beyond ``{"type": "text"}`` (no structured output)."""
    min_p: float | None = _doc(None, minimum=0, maximum=0)
    """Extension (vLLM), not supported: only 0."""
    min_tokens: int | None = _doc(None, minimum=0, maximum=0)
    """Extension (vLLM), not supported: only 0."""
    stop_token_ids: list[int] | None = _doc(None, maxItems=0)
    """Extension (vLLM), not supported: only empty."""
    use_beam_search: bool | None = _doc(None, enum=[False, None])
    """Extension (vLLM), not supported: only false."""
    guided_json: Any = _doc(None, **_NULL)
    """Extension (vLLM), not supported (guided decoding)."""
    guided_regex: Any = _doc(None, **_NULL)
    """Extension (vLLM), not supported (guided decoding)."""
    guided_choice: Any = _doc(None, **_NULL)
    """Extension (vLLM), not supported (guided decoding)."""
    guided_grammar: Any = _doc(None, **_NULL)
    """Extension (vLLM), not supported (guided decoding)."""
    structured_outputs: Any = _doc(None, **_NULL)
    """Extension (vLLM), not supported (guided decoding)."""
    prompt_logprobs: Any = _doc(None, **_NULL)
    """Extension (vLLM), not supported (completions' ``echo`` with ``logprobs`` scores the prompt)."""
    allowed_token_ids: Any = _doc(None, **_NULL)
    """Extension (vLLM), not supported (``logit_bias`` can ban tokens)."""
    bad_words: list[str] | None = _doc(None, maxItems=0)
    """Extension (vLLM), not supported: only empty."""
    truncate_prompt_tokens: Any = _doc(None, **_NULL)
    """Extension (vLLM), not supported."""
    include_stop_str_in_output: bool | None = _doc(None, enum=[False, None])
    """Extension (vLLM), not supported: only false (a stop string is never in the output)."""
    skip_special_tokens: bool | None = _doc(None, enum=[True, None])
    """Extension (vLLM): only true (special tokens are never in the text)."""
    return_tokens_as_token_ids: bool | None = _doc(None, enum=[False, None])
    """Extension (vLLM), not supported: only false."""

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        options = self.stream_options
        return bool(self.stream and options and options.continuous_usage_stats)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = _doc(minLength=1, minItems=1)
    """A prompt (a string or token ids), or a list of them: each gets ``n`` choices, choice
    ``i`` of prompt ``p`` answering as index ``p * n + i``."""
    max_tokens: int | None = _doc(16, minimum=0)
    """0 only with ``echo``: the prompt comes back, scored, and nothing is generated."""
    logprobs: int | None = _doc(None, **_TOP)
    echo: bool | None = False
    """Put the prompt (and with ``logprobs`` its tokens' log-probabilities) before each choice."""
    best_of: int | None = _doc(None, minimum=1)
    """Generate this many choices per prompt (at least ``n``) and return the ``n`` with the
    highest log-probability per token; with ``stream``, only equal to ``n``."""
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
    """Wins over ``max_tokens``."""
    logprobs: bool | None = False
    top_logprobs: int | None = _doc(None, **_TOP)
    """Needs ``logprobs: true``."""
    # Not supported: a 400 names them when set (see ``prompts.reject_unsupported``).
    tools: list[Any] | None = _doc(None, maxItems=0)
    """Not supported (tool calling): only empty."""
    tool_choice: Any = _doc(None, enum=["none", "auto", None])
    """Not supported (tool calling): only "none" or "auto" (with no tools, no call is made)."""
    functions: list[Any] | None = _doc(None, maxItems=0)
    """Not supported (function calling): only empty."""
    function_call: Any = _doc(None, enum=["none", "auto", None])
    """Not supported (function calling): only "none" or "auto"."""
    audio: Any = _doc(None, **_NULL)
    """Not supported (text only)."""
    modalities: list[str] | None = _doc(None, items={"enum": ["text"]})
    """Only ``["text"]``."""
    prediction: Any = _doc(None, **_NULL)
    """Not supported (predicted outputs)."""
    web_search_options: Any = _doc(None, **_NULL)
    """Not supported."""
    reasoning_effort: Any = _doc(None, **_NULL)
    """Not supported (no reasoning models here)."""
    echo: bool | None = _doc(None, enum=[False, None])
    """Extension (vLLM), not supported on chat: only false."""
    add_generation_prompt: bool | None = _doc(None, enum=[True, None])
    """Extension (vLLM): only true (the template's assistant prompt is always added)."""
    continue_final_message: bool | None = _doc(None, enum=[False, None])
    """Extension (vLLM), not supported: only false."""
    chat_template: Any = _doc(None, **_NULL)
    """Extension (vLLM), not supported (the model's own template is used)."""
    chat_template_kwargs: dict[str, Any] | None = _doc(None, maxProperties=0)
    """Extension (vLLM), not supported: only empty."""


# ---- vLLM's runtime adapter API ------------------------------------------------------------


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    """The model name to serve it as: a task, or ``task@version``."""
    lora_path: str = Field(min_length=1)
    """The adapter's directory on the server (adapter_config.json, adapter_model.safetensors)."""
    load_inplace: bool = False
    """vLLM's in-place reload of a served name: refused here (unload first, or roll it out)."""


class UnloadLoRAAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    """A task (every version of it goes) or ``task@version``."""
    lora_int_id: int | None = None
    """vLLM's numeric adapter id: accepted with ``lora_name``, which names the adapter here."""


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
    """The legacy completions shape: parallel lists, one entry per token (with ``echo``, the
    prompt's tokens first: the very first has no logprob)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
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
