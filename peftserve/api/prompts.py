"""Request bodies -> prompt token ids and SamplingParams, with OpenAI-style 400s."""

from __future__ import annotations

from typing import Any

from peftserve.api.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)
from peftserve.engine.sampling_params import InvalidParameter, SamplingParams
from peftserve.server.errors import invalid_request, unsupported

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def completion_prompts(tokenizer: Any, prompt: str | list, vocab_size: int, limit: int) -> list[list[int]]:
    """The prompts of a completion request (a string, token ids, or a list of either; at most
    ``limit``) as token ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > limit:
            raise invalid_request(f"At most {limit} prompts per request, got {len(prompt)}.", "prompt")
        return [_prompt_ids(tokenizer, one, vocab_size, f"prompt[{i}]") for i, one in enumerate(prompt)]
    return [_prompt_ids(tokenizer, prompt, vocab_size, "prompt")]


def prompt_texts(tokenizer: Any, prompt: str | list, prompt_ids: list[list[int]]) -> list[str]:
    """Each prompt's text (``echo``): as sent, or its token ids decoded."""
    given = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
    return [one if isinstance(one, str) else tokenizer.decode(ids) for one, ids in zip(given, prompt_ids, strict=True)]


def _prompt_ids(tokenizer: Any, prompt: str | list[int], vocab_size: int, param: str) -> list[int]:
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        ids = _checked_token_ids(prompt, vocab_size, param)
    if not ids:
        raise invalid_request("The prompt is empty.", param)
    return ids


def _checked_token_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise invalid_request(f"Token id {bad[0]} is out of range 0..{vocab_size - 1}.", param)
    return list(ids)


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """Render the chat template, then tokenize it without adding special tokens again."""
    if not messages:
        raise invalid_request("messages must hold at least one message.", "messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise invalid_request(
            "This model has no chat template; use /v1/completions.", "messages", "no_chat_template"
        )
    rendered = [_message_dict(m, i) for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _message_dict(message: ChatMessage, index: int) -> dict[str, str]:
    if message.role not in CHAT_ROLES:
        raise invalid_request(
            f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, not {message.role!r}.",
            f"messages[{index}].role",
        )
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": _message_text(message, index)}


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise unsupported(f"messages[{index}].content", f"Content part type {part.type!r}")
        parts.append(part.text)
    return "".join(parts)


def context_max_tokens(
    prompt_len: int,
    max_tokens: int | None,
    max_model_len: int,
    prompt_param: str = "prompt",
    tokens_param: str = "max_tokens",
) -> int:
    """``max_tokens`` checked against the context (None fills what the prompt leaves)."""
    if prompt_len >= max_model_len:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens, "
            f"but the prompt has {prompt_len} tokens.",
            prompt_param,
            "context_length_exceeded",
        )
    if max_tokens is None:
        return max_model_len - prompt_len
    if max_tokens >= 1 and prompt_len + max_tokens > max_model_len:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens, but "
            f"{prompt_len + max_tokens} were requested ({prompt_len} in the prompt, "
            f"{max_tokens} for the completion). Reduce the prompt or {tokens_param}.",
            tokens_param,
            "context_length_exceeded",
        )
    return max_tokens


def reject_unsupported(body: SamplingFields) -> None:
    """Fields we know but cannot honour get a 400 naming them instead of being ignored."""
    if body.stream_options is not None and not body.stream:
        raise invalid_request(
            "stream_options is only allowed when stream is true.", "stream_options"
        )
    response_format = body.response_format
    if response_format is not None and response_format.get("type", "text") != "text":
        kind = response_format.get("type")
        raise unsupported("response_format", f"response_format of type {kind!r} (structured output)")
    for name in ("min_p", "min_tokens"):
        if getattr(body, name):
            raise unsupported(name, name)
    if body.stop_token_ids:
        raise unsupported("stop_token_ids", "stop_token_ids")
    if body.use_beam_search:
        raise unsupported("use_beam_search", "Beam search")
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
        if getattr(body, name) is not None:
            raise unsupported(name, f"{name} (guided decoding)")
    if isinstance(body, CompletionRequest):
        _reject_completion_only(body)
    elif isinstance(body, ChatCompletionRequest):
        _reject_chat_only(body)


def _reject_completion_only(body: CompletionRequest) -> None:
    if body.suffix:
        raise unsupported("suffix", "suffix")
    if body.best_of is not None and body.stream and body.best_of != (body.n or 1):
        raise invalid_request("best_of cannot be used with stream (choices are picked at the end).", "best_of")
    if body.max_tokens == 0 and not body.echo:
        raise invalid_request("max_tokens must be at least 1 (0 only with echo).", "max_tokens")


def _reject_chat_only(body: ChatCompletionRequest) -> None:
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise unsupported(name, f"{name} (tool and function calling)")
    for name, allowed in (("tool_choice", ("none", "auto")), ("function_call", ("none", "auto"))):
        value = getattr(body, name)
        if value is not None and value not in allowed:
            raise unsupported(name, f"{name} {value!r} (tool and function calling)")
    for name in ("audio", "prediction", "web_search_options", "reasoning_effort"):
        if getattr(body, name) is not None:
            raise unsupported(name, name)
    if body.modalities is not None and set(body.modalities) - {"text"}:
        raise unsupported("modalities", f"modalities {body.modalities} (text only)")


def logit_bias(body: SamplingFields) -> dict[int, float]:
    """``logit_bias`` with its token ids as integers (400 for a key that is not one)."""
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise invalid_request(
                f"logit_bias keys must be token ids (integers as strings), got {key!r}.", "logit_bias"
            ) from None
        bias[token] = value
    return bias


def sampling_params(
    body: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    tokens_param: str = "max_tokens",
    **extra: Any,
) -> SamplingParams:
    """SamplingParams from the body (``extra``: fields the route decides, such as ``n``); its
    range checks become 400s naming the parameter."""
    fields: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": -1 if body.top_k is None else body.top_k,
        "seed": body.seed,
        "stop": body.stop_list,
        "logprobs": logprobs,
        "ignore_eos": body.ignore_eos,
        "n": 1 if body.n is None else body.n,
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
        "logit_bias": logit_bias(body),
    }
    try:
        return SamplingParams(**{**fields, **extra})
    except InvalidParameter as e:
        param = tokens_param if e.param == "max_tokens" else e.param
        raise invalid_request(str(e).replace("max_tokens", param), param) from None


def chat_logprobs(body: ChatCompletionRequest) -> int | None:
    """Chat's (logprobs: bool, top_logprobs: int) as the engine's top-k count or None."""
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid_request("top_logprobs requires logprobs to be true.", "top_logprobs")
    if not body.logprobs:
        return None
    top = body.top_logprobs or 0
    if not 0 <= top <= 20:
        raise invalid_request(f"top_logprobs must be in 0..20, got {top}.", "top_logprobs")
    return top


def chat_max_tokens(body: ChatCompletionRequest) -> tuple[int | None, str]:
    """The completion budget and the parameter that gave it (max_completion_tokens wins)."""
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens, "max_completion_tokens"
    return body.max_tokens, "max_tokens"
