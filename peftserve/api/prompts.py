"""Request bodies -> prompt token ids and SamplingParams, with OpenAI-style 400s.

Before a prompt text is tokenized, ``check_prompt_chars`` refuses one that cannot fit the
context whatever its tokenization, using the bound of ``prompt_char_limit``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from peftserve.api.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)
from peftserve.engine.sampling_params import InvalidParameter, SamplingParams
from peftserve.server.errors import APIError, invalid_request, unsupported

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
NORMALIZER_SHRINK = 4
"""Most characters a whitelisted normalizer turns into one (NFC/NFKC compose at most 3)."""
_KEEPING_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts"}


def prompt_char_limit(tokenizer: Any, max_model_len: int) -> int | None:
    """Most characters a prompt of ``max_model_len`` tokens can have, or None without a sound bound.

    The bound holds for tokenizers that drop no input: byte-level BPE and BPE with byte
    fallback (every byte has a token, nothing becomes one unknown token), behind normalizers
    and pre-tokenizers that delete nothing. Then each token covers at most as many characters
    of the normalized text as its own string has (``max_token_chars``), and normalization
    shrinks the text at most ``NORMALIZER_SHRINK`` times, so a prompt longer than
    ``max_model_len * max_token_chars * NORMALIZER_SHRINK`` characters cannot fit.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        return None
    byte_level = _mentions(spec.get("pre_tokenizer"), "ByteLevel")
    if not (_covers_bytes(vocab, byte_level, bool(model.get("byte_fallback")))
            and _keeps(spec.get("normalizer"), _is_keeping_normalizer)
            and _keeps(spec.get("pre_tokenizer"), _is_keeping_pre_tokenizer)):  # fmt: skip
        logger.info("no prompt-length bound before tokenizing: the tokenizer may drop input")
        return None
    added = (token.get("content", "") for token in spec.get("added_tokens") or [])
    max_token_chars = max(len(text) for text in (*vocab, *added))
    return max_model_len * max_token_chars * NORMALIZER_SHRINK


def _covers_bytes(vocab: dict[str, int], byte_level: bool, byte_fallback: bool) -> bool:
    """Whether every byte has a token (so no input is dropped or merged into an unknown token)."""
    if byte_fallback:
        return all(f"<0x{b:02X}>" in vocab for b in range(256))
    if byte_level:
        from tokenizers.pre_tokenizers import ByteLevel

        return all(char in vocab for char in ByteLevel.alphabet())
    return False


def _mentions(node: Any, kind: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == kind or any(_mentions(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, kind) for v in node)
    return False


def _keeps(node: Any, keeping: Any) -> bool:
    """Whether a normalizer or pre-tokenizer (None, one, or a Sequence) deletes no input."""
    if node is None:
        return True
    if node.get("type") == "Sequence":
        parts = node.get("normalizers") or node.get("pretokenizers") or []
        return all(_keeps(part, keeping) for part in parts)
    return keeping(node)


def _is_keeping_normalizer(node: dict[str, Any]) -> bool:
    if node.get("type") == "Replace":  # one character for a non-empty text: nothing shrinks
        pattern = node.get("pattern") or {}
        return len(pattern.get("String", "")) == 1 and bool(node.get("content"))
    return node.get("type") in _KEEPING_NORMALIZERS


def _is_keeping_pre_tokenizer(node: dict[str, Any]) -> bool:
    if node.get("type") == "Split":
        return node.get("behavior") != "Removed"
    return node.get("type") in _KEEPING_PRE_TOKENIZERS


def check_prompt_chars(texts: Iterable[str], limits: PromptLimits, param: str) -> None:
    """400 ``context_length_exceeded`` for a prompt too long for any tokenization, untokenized."""
    if limits.char_limit is None:
        return
    chars = sum(len(text) for text in texts)
    if chars > limits.char_limit:
        at_least = chars * limits.max_model_len // limits.char_limit
        raise invalid_request(
            f"This model's maximum context length is {limits.max_model_len} tokens, but the "
            f"prompt has {chars} characters: at least {at_least} tokens, whatever their split.",
            param,
            "context_length_exceeded",
        )


@dataclass(frozen=True)
class PromptLimits:
    """The context, and the most characters a prompt text may have before it is tokenized."""

    max_model_len: int
    char_limit: int | None = None
    """From ``prompt_char_limit``; None: every text is tokenized, then measured."""

    @classmethod
    def of(cls, tokenizer: Any, max_model_len: int) -> PromptLimits:
        return cls(max_model_len, prompt_char_limit(tokenizer, max_model_len))


def is_prompt_list(prompt: str | list) -> bool:
    """Whether a completion's ``prompt`` is a list of prompts (strings or token-id lists)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))


def completion_prompts(
    tokenizer: Any,
    prompt: str | list,
    vocab_size: int,
    limits: PromptLimits | None = None,
    max_prompts: int | None = None,
) -> list[list[int]]:
    """The prompts of a completion request (a string, token ids, or a list of either; at most
    ``max_prompts``) as token ids, each checked against the context on its own."""
    if is_prompt_list(prompt):
        if max_prompts is not None and len(prompt) > max_prompts:
            message = f"At most {max_prompts} prompts per request, got {len(prompt)}."
            raise invalid_request(message, "prompt")
        return [
            _prompt_ids(tokenizer, one, vocab_size, limits, f"prompt[{i}]")
            for i, one in enumerate(prompt)
        ]
    return [_prompt_ids(tokenizer, prompt, vocab_size, limits, "prompt")]


def prompt_texts(tokenizer: Any, prompt: str | list, prompt_ids: list[list[int]]) -> list[str]:
    """Each prompt's text (``echo``): as sent, or its token ids decoded."""
    given = prompt if is_prompt_list(prompt) else [prompt]
    return [
        one if isinstance(one, str) else tokenizer.decode(ids)
        for one, ids in zip(given, prompt_ids, strict=True)
    ]


def _prompt_ids(
    tokenizer: Any,
    prompt: str | list[int],
    vocab_size: int,
    limits: PromptLimits | None,
    param: str,
) -> list[int]:
    if isinstance(prompt, str):
        if limits is not None:
            check_prompt_chars([prompt], limits, param)
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        if limits is not None and len(prompt) >= limits.max_model_len:
            raise context_exceeded(len(prompt), limits.max_model_len, param)
        ids = _checked_token_ids(prompt, vocab_size, param)
    if not ids:
        raise invalid_request("The prompt is empty.", param)
    return ids


def _checked_token_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise invalid_request(f"Token id {bad[0]} is out of range 0..{vocab_size - 1}.", param)
    return list(ids)


def chat_prompt_ids(
    tokenizer: Any, messages: list[ChatMessage], limits: PromptLimits | None = None
) -> list[int]:
    """Render the chat template, then tokenize it without adding special tokens again."""
    if not messages:
        raise invalid_request("messages must hold at least one message.", "messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise invalid_request(
            "This model has no chat template; use /v1/completions.", "messages", "no_chat_template"
        )
    rendered = [_message_dict(m, i) for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # the template refuses the conversation (raise_exception)
        raise invalid_request(
            f"The model's chat template refused these messages: {exc}",
            "messages",
            "invalid_messages",
        ) from None
    if limits is not None:
        check_prompt_chars([text], limits, "messages")
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
        raise context_exceeded(prompt_len, max_model_len, prompt_param)
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


def context_exceeded(prompt_len: int, max_model_len: int, param: str) -> APIError:
    return invalid_request(
        f"This model's maximum context length is {max_model_len} tokens, "
        f"but the prompt has {prompt_len} tokens.",
        param,
        "context_length_exceeded",
    )


def reject_unsupported(body: SamplingFields) -> None:
    """Fields we know but cannot honour get a 400 naming them instead of being ignored."""
    if body.stream_options is not None and not body.stream:
        raise invalid_request(
            "stream_options is only allowed when stream is true.", "stream_options"
        )
    response_format = body.response_format
    if response_format is not None and response_format.get("type", "text") != "text":
        kind = response_format.get("type")
        raise unsupported(
            "response_format", f"response_format of type {kind!r} (structured output)"
        )
    for name in ("min_p", "min_tokens"):
        if getattr(body, name):
            raise unsupported(name, name)
    if body.stop_token_ids:
        raise unsupported("stop_token_ids", "stop_token_ids")
    if body.use_beam_search:
        raise unsupported("use_beam_search", "Beam search")
    for name in (
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "structured_outputs",
    ):
        if getattr(body, name) is not None:
            raise unsupported(name, f"{name} (guided decoding)")
    _reject_values(body, _VLLM_ONLY)
    if isinstance(body, CompletionRequest):
        _reject_completion_only(body)
    elif isinstance(body, ChatCompletionRequest):
        _reject_values(body, _VLLM_CHAT_ONLY)
        _reject_chat_only(body)


_VLLM_ONLY: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("prompt_logprobs", (None,)),
    ("allowed_token_ids", (None,)),
    ("bad_words", (None, [])),
    ("truncate_prompt_tokens", (None,)),
    ("include_stop_str_in_output", (None, False)),
    ("skip_special_tokens", (None, True)),
    ("return_tokens_as_token_ids", (None, False)),
)
"""vLLM's request extensions we do not implement, with the values that change nothing."""
_VLLM_CHAT_ONLY: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("echo", (None, False)),
    ("add_generation_prompt", (None, True)),
    ("continue_final_message", (None, False)),
    ("chat_template", (None,)),
    ("chat_template_kwargs", (None, {})),
)


def _reject_values(body: SamplingFields, fields: tuple[tuple[str, tuple[Any, ...]], ...]) -> None:
    for name, harmless in fields:
        value = getattr(body, name)
        if not any(value is h or (type(value) is type(h) and value == h) for h in harmless):
            raise unsupported(name, f"{name}={json.dumps(value)[:80]}")


def _reject_completion_only(body: CompletionRequest) -> None:
    if body.suffix:
        raise unsupported("suffix", "suffix")
    if body.best_of is not None and body.stream and body.best_of != (body.n or 1):
        raise invalid_request(
            "best_of cannot be used with stream (choices are picked at the end).", "best_of"
        )
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
        if not (key.isascii() and key.isdigit()):
            message = f"logit_bias keys must be token ids (decimal digits), got {key!r}."
            raise invalid_request(message, "logit_bias")
        bias[int(key)] = value
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
