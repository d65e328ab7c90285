"""The OpenAI-compatible API over real HTTP on loopback, with the real ``openai`` client."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.server_utils import engine_stats, running_server, wait_for
from tests.tiny_models import make_peft_adapter, make_tiny_model

LONG = 8000
"""A generation budget that takes the tiny model 10+ s: a disconnect must cut it short."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("model"), "llama", max_position_embeddings=LONG + 192
    )


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_peft_adapter(model_dir, root / "alpha", r=4, seed=1, std=0.3),
        "beta": make_peft_adapter(model_dir, root / "beta", r=8, seed=2, std=0.3,
                                  target_modules=["q_proj", "v_proj", "o_proj"]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def url(model_dir: Path, adapters: dict[str, Path]) -> Iterator[str]:
    with running_server(model_dir, adapters, served_model_name="base", max_num_seqs=8) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


def _sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an event stream, checking the framing on the way."""
    body = response.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "", "stream must end with a blank line"
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        payloads.append(event[len("data: ") :])
    return payloads


def _greedy(client: openai.OpenAI, model: str, prompt: str, max_tokens: int = 24, **kw) -> str:
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    out = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra, **kw
    )
    return out.choices[0].text


# ---- models and health --------------------------------------------------------------------


def test_models_lists_base_and_adapters(client: openai.OpenAI, model_dir: Path, adapters) -> None:
    models = {m.id: m for m in client.models.list().data}
    pinned = {m for m in models if "@" in m}  # each task@version (startup ones: sha256[:12])
    assert set(models) - pinned == {"base", "alpha", "beta"}
    assert {m.split("@")[0] for m in pinned} == {"alpha", "beta"}
    assert models["base"].root == model_dir.name  # never a path on the server
    assert models["base"].parent is None
    for name in ("alpha", "beta"):
        assert models[name].parent == "base"
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", models[name].root), models[name].root
        assert models[name].object == "model" and models[name].owned_by == "peftserve"
    assert client.models.retrieve("alpha").id == "alpha"


def test_health_reports_engine_stats(url: str) -> None:
    response = httpx.get(f"{url}/health")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "ok"
    assert body["model"] == "base" and body["adapters"] == ["alpha", "beta"]
    for key in (
        "steps",
        "mixed_lora_steps",
        "num_running",
        "num_waiting",
        "kv_blocks_used",
        "kv_blocks_total",
    ):
        assert isinstance(body["engine"][key], int), key
    assert response.headers["x-request-id"].startswith("req-")


# ---- completions ---------------------------------------------------------------------------


def test_completion_plain(client: openai.OpenAI, tokenizer) -> None:
    raw = client.completions.with_raw_response.create(
        model="alpha", prompt="abc abc", max_tokens=12, extra_body={"ignore_eos": True}
    )
    out = raw.parse()
    assert out.id.startswith("cmpl-") and raw.headers["x-request-id"] == out.id
    assert out.object == "text_completion" and out.model == "alpha"
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    assert isinstance(out.choices[0].text, str) and out.choices[0].logprobs is None
    prompt_tokens = len(tokenizer("abc abc")["input_ids"])
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == prompt_tokens + 12


def test_completion_prompt_forms(client: openai.OpenAI, tokenizer) -> None:
    text = _greedy(client, "base", "hello", max_tokens=8)
    assert _greedy(client, "base", ["hello"], max_tokens=8) == text
    ids = tokenizer("hello")["input_ids"]
    assert _greedy(client, "base", ids, max_tokens=8) == text
    out = client.completions.create(model="base", prompt=[ids], max_tokens=3)
    assert out.usage.prompt_tokens == len(ids)


def test_adapters_change_the_output_and_greedy_is_deterministic(client: openai.OpenAI) -> None:
    outputs = {m: _greedy(client, m, "the quick brown fox") for m in ("base", "alpha", "beta")}
    assert len(set(outputs.values())) == 3, outputs
    assert _greedy(client, "alpha", "the quick brown fox") == outputs["alpha"]


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        out = client.completions.create(
            model="beta", prompt="xyz", max_tokens=24, temperature=1.0, seed=seed,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return out.choices[0].text

    assert sample(7) == sample(7)


def test_stop_string_cuts_the_output(client: openai.OpenAI) -> None:
    full = _greedy(client, "alpha", "stop here", max_tokens=40)
    stop = next((c for c in full[3:] if c.strip()), None)
    if stop is None:
        pytest.skip(f"greedy output has no usable stop character: {full!r}")
    for form in (stop, [stop, "never-appears"]):
        out = client.completions.create(
            model="alpha", prompt="stop here", max_tokens=40, temperature=0, stop=form,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert out.choices[0].text == full[: full.index(stop)]
        assert out.choices[0].finish_reason == "stop"


def _visible(tokens: list[str], tokenizer) -> str:
    """Token texts joined, minus special tokens (the engine's text skips those)."""
    return "".join(t for t in tokens if t not in tokenizer.all_special_tokens)


def test_completion_logprobs(client: openai.OpenAI, tokenizer) -> None:
    out = client.completions.create(
        model="alpha", prompt="abc", max_tokens=6, logprobs=3, extra_body={"ignore_eos": True}
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert _visible(lp.tokens, tokenizer) == out.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_completion_stream(client: openai.OpenAI) -> None:
    expected = _greedy(client, "beta", "stream me", max_tokens=16)
    chunks = list(
        client.completions.create(
            model="beta", prompt="stream me", max_tokens=16, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert all(c.object == "text_completion" and c.model == "beta" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)


def test_completion_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="alpha", prompt="abc", max_tokens=5, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_raw_framing(url: str) -> None:
    body = {"model": "alpha", "prompt": "abc", "max_tokens": 4, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"].startswith("cmpl-")
        payloads = _sse_events(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("usage" not in c for c in chunks)
    assert set(chunks[0]) == {"id", "object", "created", "model", "choices"}
    assert set(chunks[0]["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    assert chunks[0]["id"] == response.headers["x-request-id"]


# ---- chat ----------------------------------------------------------------------------------


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def test_chat_plain(client: openai.OpenAI, tokenizer) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="beta", messages=MESSAGES, max_completion_tokens=10, extra_body={"ignore_eos": True}
    )
    out = raw.parse()
    assert out.id.startswith("chatcmpl-") and raw.headers["x-request-id"] == out.id
    assert out.object == "chat.completion" and out.model == "beta"
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.choices[0].finish_reason == "length"
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 10)
    assert out.usage.total_tokens == prompt_tokens + 10


def test_chat_max_tokens_and_content_parts(client: openai.OpenAI) -> None:
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
        }
    ]
    a = client.chat.completions.create(
        model="alpha", messages=parts, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    b = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi there"}], max_tokens=7,
        temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert a.usage.completion_tokens == 7
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_logprobs(client: openai.OpenAI, tokenizer) -> None:
    out = client.chat.completions.create(
        model="alpha", messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    assert _visible([t.token for t in content], tokenizer) == out.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert 1 <= len(t.top_logprobs) <= 2
    plain = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_chat_stream(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model="beta",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    chunks = list(
        client.chat.completions.create(
            model="beta", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunk, final = chunks[-1], chunks[-2]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 12
    assert final.choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == plain.choices[0].message.content


def test_chat_stream_raw_chunk_shapes(url: str) -> None:
    body = {
        "model": "alpha",
        "messages": MESSAGES,
        "max_tokens": 3,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        payloads = _sse_events(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    middle = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert middle and all(set(d) == {"content"} for d in middle)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")


def test_unknown_fields_are_ignored(url: str) -> None:
    body = {"model": "base", "prompt": "a", "max_tokens": 2, "frobnicate": 3, "tools": []}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text


# ---- many adapters in one engine -----------------------------------------------------------


def test_concurrent_adapters_share_engine_steps(client: openai.OpenAI, url: str) -> None:
    before = engine_stats(url)["mixed_lora_steps"]
    models = ["alpha", "beta", "base", "alpha", "beta", "base"]

    def run(model: str) -> int:
        out = client.completions.create(
            model=model, prompt=f"hello {model}", max_tokens=48, extra_body={"ignore_eos": True}
        )
        return out.usage.completion_tokens

    with ThreadPoolExecutor(len(models)) as pool:
        assert list(pool.map(run, models)) == [48] * len(models)
    assert engine_stats(url)["mixed_lora_steps"] > before


# ---- disconnects free the sequence and its KV blocks ---------------------------------------


def _idle(url: str) -> bool:
    stats = engine_stats(url)
    return stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_blocks_used"] == 0


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_stream_disconnect_frees_sequence_and_kv_blocks(url: str, route: str) -> None:
    body = {"model": "alpha", "max_tokens": LONG, "stream": True, "ignore_eos": True}
    body.update({"prompt": "abc"} if route == "completions" else {"messages": MESSAGES})
    generated = engine_stats(url)["generated_tokens"]
    with httpx.stream("POST", f"{url}/v1/{route}", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        stats = engine_stats(url)
        assert stats["num_running"] == 1 and stats["kv_blocks_used"] > 0
    assert wait_for(lambda: _idle(url), timeout=3.0), engine_stats(url)
    assert engine_stats(url)["generated_tokens"] - generated < LONG // 4  # cut, not finished


def test_nonstream_disconnect_frees_sequence_and_kv_blocks(url: str) -> None:
    body = {"model": "beta", "prompt": "abc", "max_tokens": LONG, "ignore_eos": True}
    generated = engine_stats(url)["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    assert wait_for(lambda: _idle(url), timeout=3.0), engine_stats(url)
    assert engine_stats(url)["generated_tokens"] - generated < LONG // 4
