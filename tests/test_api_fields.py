"""The OpenAI request fields people send, over real HTTP with the real ``openai`` client.

``n`` > 1 and ``best_of``, ``seed`` with ``n`` > 1, ``echo`` (with ``max_tokens: 0`` too),
``prompt`` as a list of strings or of token-id lists (choice ``i`` of prompt ``p`` is index
``p * n + i``), ``stream_options.include_usage``, ``logit_bias``, presence / frequency /
repetition penalties (greedy outputs against a float64 torch reference of the rule over HF's
forward), ``max_completion_tokens`` on chat, streaming and not; and the fields we do not
support answered with a 400 naming them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import AutoTokenizer

from tests.engine_helpers import load_hf
from tests.server_utils import running_server
from tests.tiny_models import SPECIALS, make_tiny_model

NO_SPECIALS = {str(i): -100 for i in range(len(SPECIALS))}
"""logit_bias that keeps the tiny model off its special tokens (their text is empty)."""
MESSAGES = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), "llama")


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[openai.OpenAI]:
    with running_server(model_dir, served_model_name="base", max_num_seqs=8) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir: Path):
    return load_hf(model_dir)


def _complete(client: openai.OpenAI, prompt: Any, **kw: Any):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    return client.completions.create(model="base", prompt=prompt, extra_body=extra, **kw)


def _texts(out) -> list[str]:
    assert [c.index for c in out.choices] == list(range(len(out.choices)))
    return [c.text for c in out.choices]


def _streamed(chunks) -> tuple[dict[int, str], dict[int, str | None], Any]:
    """Completion or chat chunks -> (text by choice index, finish reason by index, usage)."""
    texts: dict[int, str] = defaultdict(str)
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in chunks:
        if not chunk.choices:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = getattr(choice, "delta", None)
            texts[choice.index] += (delta.content or "") if delta is not None else choice.text
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    return dict(texts), finish, usage


# ---- n, seed, best_of -----------------------------------------------------------------------


def test_greedy_choices_all_equal_one_choice(client: openai.OpenAI) -> None:
    one = _texts(_complete(client, "abc"))
    three = _complete(client, "abc", n=3)
    assert _texts(three) == one * 3
    assert three.usage.completion_tokens == 3 * 6 and three.usage.prompt_tokens == 3


def test_seeded_choices_differ_repeat_and_stream_alike(client: openai.OpenAI) -> None:
    kw = {
        "n": 3,
        "temperature": 1.0,
        "seed": 7,
        "max_tokens": 8,
        "extra_body": {"logit_bias": NO_SPECIALS},
    }
    texts = _texts(_complete(client, "abc", **kw))
    assert len(set(texts)) == 3, texts  # each choice draws its own tokens
    assert _texts(_complete(client, "abc", **kw)) == texts  # ... reproducibly
    one = _complete(client, "abc", **{**kw, "n": 1})
    assert _texts(one) == texts[:1]  # choice 0 draws as n = 1 does
    streamed, finish, _ = _streamed(_complete(client, "abc", stream=True, **kw))
    assert streamed == dict(enumerate(texts)) and finish == dict.fromkeys(range(3), "length")
    chat = {"messages": MESSAGES, "n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 6}
    a = client.chat.completions.create(model="base", **chat)
    assert [c.index for c in a.choices] == [0, 1]
    contents = [c.message.content for c in a.choices]
    assert contents[0] != contents[1]
    assert [
        c.message.content for c in client.chat.completions.create(model="base", **chat).choices
    ] == contents


def test_best_of_returns_the_n_best_per_token(client: openai.OpenAI) -> None:
    kw = {
        "temperature": 1.0,
        "seed": 11,
        "max_tokens": 6,
        "extra_body": {"logit_bias": NO_SPECIALS},
    }
    every = _complete(client, "abc", n=4, logprobs=0, **kw)  # the same four draws, scored
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every.choices]
    ranked = [every.choices[i].text for i in sorted(range(4), key=lambda i: -means[i])]
    best = _complete(client, "abc", n=2, best_of=4, **kw)
    assert _texts(best) == ranked[:2]
    assert all(c.logprobs is None for c in best.choices)  # scored to rank, not asked for
    assert best.usage.completion_tokens == 4 * 6  # every generated choice counts
    with pytest.raises(openai.BadRequestError) as info:
        _complete(client, "abc", n=2, best_of=4, stream=True)
    assert info.value.param == "best_of"


# ---- echo -----------------------------------------------------------------------------------


def test_echo_puts_the_scored_prompt_first(client: openai.OpenAI, hf, tokenizer) -> None:
    prompt, bias = "abcab", {"logit_bias": NO_SPECIALS}  # one character per token
    plain = _texts(_complete(client, prompt, max_tokens=3, extra_body=bias))[0]
    out = _complete(client, prompt, max_tokens=3, echo=True, logprobs=1, extra_body=bias)
    choice = out.choices[0]
    assert choice.text == prompt + plain
    lp = choice.logprobs
    assert lp.tokens == list(prompt + plain) and lp.text_offset == list(range(len(prompt) + 3))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    for i, token in enumerate(ids[1:]):
        assert lp.token_logprobs[i + 1] == pytest.approx(want[i, token].item(), abs=1e-4)
        assert len(lp.top_logprobs[i + 1]) == 1
    streamed, _, _ = _streamed(
        _complete(client, prompt, max_tokens=3, echo=True, stream=True, extra_body=bias)
    )
    assert streamed == {0: prompt + plain}
    only = _complete(client, prompt, max_tokens=0, echo=True, logprobs=0)
    assert _texts(only) == [prompt] and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.tokens == list(prompt)
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        lp.token_logprobs[1 : len(prompt)]
    )


# ---- prompt lists ----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["strings", "token ids"])
def test_prompt_lists_number_choices_prompt_major(
    client: openai.OpenAI, tokenizer, form: str
) -> None:
    prompts = ["abc", "xyz 12"]
    given = prompts if form == "strings" else [tokenizer(p)["input_ids"] for p in prompts]
    single = [_texts(_complete(client, p))[0] for p in prompts]
    out = _complete(client, given, n=2)
    assert _texts(out) == [single[0], single[0], single[1], single[1]]
    assert out.usage.prompt_tokens == 3 + 6 and out.usage.completion_tokens == 4 * 6
    chunks = list(
        _complete(client, given, n=2, stream=True, stream_options={"include_usage": True})
    )
    streamed, finish, usage = _streamed(chunks)
    assert streamed == dict(enumerate(_texts(out))) and set(finish) == {0, 1, 2, 3}
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert usage == out.usage  # the final chunk: every prompt and choice


# ---- stream_options and max_completion_tokens on chat -----------------------------------------


def test_chat_max_completion_tokens_and_usage_chunk_with_choices(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="base", messages=MESSAGES, max_tokens=9, max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            model="base", messages=MESSAGES, max_completion_tokens=4, n=2, seed=5, temperature=1.0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    roles = [
        c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"
    ]
    assert roles == [0, 1]  # each choice opens with its role
    _, finish, usage = _streamed(chunks)
    assert finish == {0: "length", 1: "length"}
    assert usage.completion_tokens == 8 and usage.total_tokens == usage.prompt_tokens + 8
    assert all(c.usage is None for c in chunks[:-1])
    options = {"include_usage": True, "continuous_usage_stats": True}  # vLLM's running usage
    running = list(
        client.chat.completions.create(
            model="base", messages=MESSAGES, max_completion_tokens=4, n=2, stream=True,
            stream_options=options, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    generated = [c.usage.completion_tokens for c in running]
    assert generated == sorted(generated) and generated[-1] == 8 and generated[-2] == 8


# ---- logit_bias and penalties ----------------------------------------------------------------


def _reference(
    model,
    prompt: list[int],
    steps: int,
    bias: dict[int, float],
    presence: float = 0.0,
    frequency: float = 0.0,
    repetition: float = 1.0,
) -> list[int]:
    """Greedy decoding over HF's forward with the rule in float64: logit_bias added; a token of
    the prompt or the output divided by ``repetition`` if positive, else multiplied; then
    ``frequency`` times its output count and ``presence`` once if it was generated, subtracted."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()  # [V]
        for token, value in bias.items():
            logits[token] += value
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(ids)] = True
        logits = torch.where(
            seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits
        )
        counts = torch.bincount(
            torch.tensor(ids[len(prompt) :], dtype=torch.long), minlength=len(logits)
        )
        logits = logits - frequency * counts - presence * (counts > 0)
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "penalty",
    [{"presence_penalty": 1.5}, {"frequency_penalty": 0.8}, {"repetition_penalty": 1.8},
     {"presence_penalty": -0.5, "frequency_penalty": 0.3, "repetition_penalty": 0.7}],
    ids=["presence", "frequency", "repetition", "all"],
)  # fmt: skip
def test_penalties_follow_the_reference_rule(client: openai.OpenAI, hf, tokenizer, penalty) -> None:
    prompt = tokenizer("aaab abab")["input_ids"]
    bias = {int(k): float(v) for k, v in NO_SPECIALS.items()}
    plain = _reference(hf, prompt, 12, bias)
    want = _reference(hf, prompt, 12, bias, penalty.get("presence_penalty", 0.0),
                      penalty.get("frequency_penalty", 0.0), penalty.get("repetition_penalty", 1.0))  # fmt: skip
    assert want != plain, "the penalty changes nothing here: pick another prompt"
    extra = {"logit_bias": NO_SPECIALS}
    if "repetition_penalty" in penalty:
        extra["repetition_penalty"] = penalty["repetition_penalty"]
    sdk = {k: v for k, v in penalty.items() if k != "repetition_penalty"}
    out = _complete(client, prompt, max_tokens=12, extra_body=extra, **sdk)
    assert out.choices[0].text == tokenizer.decode(want)
    plain_out = _complete(client, prompt, max_tokens=12, extra_body={"logit_bias": NO_SPECIALS})
    assert plain_out.choices[0].text == tokenizer.decode(plain)


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, tokenizer) -> None:
    plain = _texts(_complete(client, "abc", max_tokens=8, extra_body={"logit_bias": NO_SPECIALS}))[
        0
    ]
    banned = str(tokenizer.convert_tokens_to_ids(plain[0]))
    out = _complete(client, "abc", max_tokens=8, logit_bias={**NO_SPECIALS, banned: -100})
    assert plain[0] not in out.choices[0].text
    forced = str(tokenizer.convert_tokens_to_ids("z"))
    sampled = _complete(
        client, "abc", max_tokens=8, temperature=1.0, seed=1, logit_bias={forced: 100}
    )
    assert sampled.choices[0].text == "z" * 8
    chat = client.chat.completions.create(
        model="base",
        messages=MESSAGES,
        max_tokens=4,
        logit_bias={forced: 100},
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].message.content == "z" * 4


# ---- what we do not support: a 400 naming the field -------------------------------------------

_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [_TOOL]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"response_format": _SCHEMA}, "response_format"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
        ({"extra_body": {"min_tokens": 3}}, "min_tokens"),
    ],
)
def test_unsupported_chat_fields_are_400_naming_them(
    client: openai.OpenAI, fields: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=2, **fields)
    assert info.value.param == param and "not supported" in info.value.message
    assert info.value.code == "unsupported_parameter"


def test_harmless_values_of_unsupported_fields_are_accepted(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="base", messages=MESSAGES, max_tokens=2, tools=[], tool_choice="none",
        response_format={"type": "text"}, modalities=["text"],
        extra_body={"skip_special_tokens": True, "add_generation_prompt": True, "bad_words": []},
    )  # fmt: skip
    assert out.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as info:
        _complete(client, "abc", suffix="!", stream=True)
    assert info.value.param == "suffix"
