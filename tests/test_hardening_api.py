"""The public API under hostile input, over real HTTP on loopback: no 500, no freeze, no wrong 200.

One class of input per section (issue 8, items 1-6): oversized bodies and prompts, malformed
JSON (lone surrogates, deep nesting, non-JSON numbers, bad UTF-8), sampling values that
underflow in fp32, the OpenAPI document against what the server answers, waiting and
overload, and the model cards. Every refusal is checked for its status, OpenAI's error shape,
its ``param`` and its message; the sampling cases check the answer itself.
"""

from __future__ import annotations

import json
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from peftserve.api import prompts
from peftserve.api.body import MAX_JSON_DEPTH, default_body_limit
from peftserve.engine.sampler import Sampler, SamplingTensors, apply_top_p
from peftserve.engine.sampling_params import SamplingParams
from tests.server_utils import (
    adapter_parts,
    engine_stats,
    registry_snapshot,
    running_server,
    upload_parts,
    wait_for,
)
from tests.tiny_models import (
    CHAT_TEMPLATE,
    make_byte_bpe_tokenizer,
    make_peft_adapter,
    make_tiny_model,
    make_tokenizer,
)

MAX_MODEL_LEN = 64
MIB = 1 << 20
BIG_LIMIT = 16 * MIB
"""--max-request-bytes of the byte-level BPE server: a 10 MiB prompt gets past the body limit."""
API_KEY = "k-hardening"
LONG_CONTEXT = 2048
"""The context of the servers that keep a long generation running while others wait."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("model"), "qwen2", max_position_embeddings=LONG_CONTEXT
    )


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(model_dir, tmp_path_factory.mktemp("adapters") / "alpha", std=0.3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def url(model_dir: Path, adapter_dir: Path, data_dir: Path) -> Iterator[str]:
    """The character-level tokenizer (no prompt bound before tokenizing), the default body limit."""
    flags = {"served_model_name": "base", "max_model_len": MAX_MODEL_LEN, "data_dir": data_dir}
    with running_server(model_dir, {"alpha": adapter_dir}, **flags) as u:
        yield u


@pytest.fixture(scope="module")
def bpe_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A byte-level BPE tokenizer (prompt bound on), a 16 MiB body limit, an API key."""
    model = make_tiny_model(
        tmp_path_factory.mktemp("bpe"), "llama", tokenizer=make_byte_bpe_tokenizer()
    )
    flags = {
        "served_model_name": "base",
        "max_model_len": MAX_MODEL_LEN,
        "max_request_bytes": BIG_LIMIT,
        "api_key": [API_KEY],
    }
    with running_server(model, **flags) as u:
        yield u


def _auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> str:
    """The error message, after checking status, OpenAI's shape, param and code."""
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    kind = {429: "rate_limit_exceeded"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    assert error["type"] == kind, error
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert error["message"] and "Traceback" not in error["message"]
    assert response.headers["x-request-id"]
    return error["message"]


def _post_raw(url: str, route: str, raw: bytes, **headers: str) -> httpx.Response:
    headers = {"content-type": "application/json", **headers}
    return httpx.post(f"{url}/v1/{route}", content=raw, headers=headers, timeout=60)


def _completion(**fields: Any) -> dict:
    return {"model": "base", "prompt": "abc", "max_tokens": 2, **fields}


def _chat(**fields: Any) -> dict:
    return {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


# ---- 1. size: bodies past the limit, prompts past the context, the event loop stays free ----


def test_default_body_limit_is_sized_from_the_context(url: str) -> None:
    assert default_body_limit(MAX_MODEL_LEN) == 64 * MAX_MODEL_LEN + MIB
    big = _completion(prompt="a" * default_body_limit(MAX_MODEL_LEN))
    message = _error(httpx.post(f"{url}/v1/completions", json=big, timeout=60), 413, None, "request_too_large")
    assert str(default_body_limit(MAX_MODEL_LEN)) in message and "--max-request-bytes" in message


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("completions", _completion(prompt="a" * (10 * MIB))),
        ("completions", _completion(prompt=[[7] * (2 * MIB)])),
        ("chat/completions", _chat(messages=[{"role": "user", "content": "x" * 100}] * 20_000)),
        ("chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "y" * (3 * MIB)}]}])),
        ("feedback", {"id": "cmpl-x", "score": 1, "pad": "z" * (2 * MIB)}),
    ],
    ids=["10MiB-prompt", "2M-token-ids", "20k-messages", "3MiB-content-part", "feedback"],
)
def test_oversized_bodies_are_413(url: str, route: str, body: dict) -> None:
    raw = json.dumps(body).encode()
    _error(_post_raw(url, route, raw), 413, None, "request_too_large")


def _send_until_answered(url: str, head: str, chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """Send a request over a raw socket, chunk by chunk, stopping once the server answers;
    the answer's first bytes, and how many body bytes had been sent by then."""
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break
            sock.sendall(chunk)
            sent += len(chunk)
        return _read_response(sock), sent


def _read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (headers, then Content-Length bytes of body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _content_length(data: bytes) -> int:
    match = re.search(rb"(?im)^content-length:\s*(\d+)", data.split(b"\r\n\r\n", 1)[0])
    return int(match.group(1)) if match else 0


def test_body_past_the_declared_limit_is_413_before_a_byte_is_sent(url: str) -> None:
    head = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10 * MIB}\r\n\r\n")  # fmt: skip
    answer, sent = _send_until_answered(url, head, iter(()))
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer, answer[:300]
    assert sent == 0


def test_chunked_body_is_413_once_past_the_limit(url: str) -> None:
    head = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    piece = 64 * 1024

    def chunks() -> Iterator[bytes]:  # 64 MiB, slowly: the server must answer long before
        yield b"1d\r\n" + b'{"model": "base", "prompt": "' + b"\r\n"
        for _ in range(1024):
            yield f"{piece:x}\r\n".encode() + b"a" * piece + b"\r\n"
            time.sleep(0.005)

    answer, sent = _send_until_answered(url, head, chunks())
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer, answer[:300]
    assert sent < 4 * MIB, sent


def test_unauthenticated_big_body_is_401_unread(bpe_url: str) -> None:
    raw = json.dumps(_completion(prompt="a" * (10 * MIB))).encode()
    _error(_post_raw(bpe_url, "completions", raw), 401, None, "invalid_api_key")
    _error(_post_raw(bpe_url, "completions", b"{", authorization="Bearer wrong"), 401, None)


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", _completion(prompt="a" * (10 * MIB)), "prompt"),
        ("completions", _completion(prompt=["é" * 50_000]), "prompt[0]"),
        ("completions", _completion(prompt=" " * 200_000), "prompt"),
        ("chat/completions", _chat(model="base", messages=[{"role": "user", "content": "b" * (5 * MIB)}]), "messages"),
        ("chat/completions", _chat(model="base", messages=[{"role": "user", "content": "hi " * 1000}] * 100), "messages"),
    ],
    ids=["10MiB", "accents", "spaces", "5MiB-chat", "100-messages"],
)
def test_prompt_past_any_tokenization_is_refused_untokenized(
    bpe_url: str, route: str, body: dict, param: str
) -> None:
    response = httpx.post(f"{bpe_url}/v1/{route}", json=body, headers=_auth(), timeout=60)
    message = _error(response, 400, param, "context_length_exceeded")
    assert "characters" in message and f"maximum context length is {MAX_MODEL_LEN}" in message


def test_prompt_bound_is_sound_for_byte_level_bpe() -> None:
    """A text over the bound never tokenizes to fewer tokens than the context."""
    tokenizer = make_byte_bpe_tokenizer()
    limit = prompts.prompt_char_limit(tokenizer, MAX_MODEL_LEN)
    assert limit is not None
    longest = max(tokenizer.get_vocab(), key=len)
    for unit in ("the quick brown fox ", " ", "a", "é", "\U0001f600", "e\u0301", longest, "<pad>", "</s>"):
        text = (unit * (limit // len(unit) + 1))[: limit + 1]
        assert len(tokenizer(text)["input_ids"]) > MAX_MODEL_LEN, unit


def test_no_prompt_bound_for_tokenizers_that_may_drop_input() -> None:
    from tokenizers import normalizers, pre_tokenizers

    assert prompts.prompt_char_limit(make_tokenizer(), MAX_MODEL_LEN) is None  # word-level, <unk>
    for change in (
        lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Whitespace()),  # drops spaces
        lambda t: setattr(t, "normalizer", normalizers.Strip()),
        lambda t: setattr(t, "normalizer", normalizers.Replace("  ", " ")),
    ):
        tokenizer = make_byte_bpe_tokenizer()
        change(tokenizer.backend_tokenizer)
        assert prompts.prompt_char_limit(tokenizer, MAX_MODEL_LEN) is None


_HAMMER = """
import json, sys, httpx
url, path, headers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
raw = open(path, "rb").read()
with httpx.Client(timeout=120) as client:
    while True:
        response = client.post(url, content=raw, headers={"content-type": "application/json", **headers})
        print(response.status_code, flush=True)
"""
"""Posts one body again and again, printing each status: the load comes from another process,
so the test's own threads do not compete with the server for the GIL."""

_BIG_BODIES = {
    "10MiB-completion": lambda: _completion(prompt="a" * (10 * MIB)),
    "10MiB-chat": lambda: _chat(model="base", messages=[{"role": "user", "content": "a" * (10 * MIB)}]),
    "10k-messages": lambda: _chat(messages=[{"role": "user", "content": "hello"}] * 10_000),
}


@pytest.mark.parametrize(
    ("server", "route", "body", "status"),
    [
        ("default", "completions", "10MiB-completion", 413),
        ("bpe", "completions", "10MiB-completion", 400),
        ("bpe", "chat/completions", "10MiB-chat", 400),
        ("default", "chat/completions", "10k-messages", 400),
    ],
    ids=["10MiB-413", "10MiB-bound", "10MiB-chat-bound", "10k-messages-tokenized"],
)
def test_health_answers_while_big_prompts_are_handled(
    request: pytest.FixtureRequest, tmp_path: Path, server: str, route: str, body: str, status: int
) -> None:
    """20 consecutive /health calls each answer within 1 s while one big request after another
    is handled; a small completion still gets its answer."""
    base = request.getfixturevalue("url" if server == "default" else "bpe_url")
    headers = _auth() if server == "bpe" else {}
    idle = _health_latencies(base, 5)
    path = tmp_path / "body.json"
    path.write_text(json.dumps(_BIG_BODIES[body]()))
    argv = [sys.executable, "-c", _HAMMER, f"{base}/v1/{route}", str(path), json.dumps(headers)]
    hammer = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        seen = [hammer.stdout.readline().strip()]  # type: ignore[union-attr]
        latencies = _health_latencies(base, 20)
        small = httpx.post(f"{base}/v1/completions", json=_completion(), headers=headers, timeout=30)
        assert small.status_code == 200, small.text
    finally:
        hammer.terminate()
        seen += hammer.communicate(timeout=60)[0].split()
    shown = " ".join(f"{x:.2f}" for x in latencies)
    assert max(latencies) < 1.0, f"/health took {shown} s (idle: {max(idle):.2f} s at most)"
    assert set(seen) == {str(status)}, seen


def _health_latencies(url: str, n: int) -> list[float]:
    """Seconds each of ``n`` consecutive GET /health calls took (one client, set up before)."""
    latencies = []
    with httpx.Client(timeout=10) as client:
        for _ in range(n):
            started = time.monotonic()
            assert client.get(f"{url}/health").status_code == 200
            latencies.append(time.monotonic() - started)
    return latencies


# ---- 2. malformed JSON: 400 naming the field, never 500 --------------------------------------

_LONE = "\\ud800"
"""A lone surrogate as a JSON escape (the raw text of the request body)."""


def _with_escape(body: dict, marker: str, escape: str = _LONE) -> bytes:
    """``body`` as JSON text with the string ``marker`` replaced by a raw JSON escape."""
    return json.dumps(body).replace(marker, escape).encode()


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", _completion(prompt="a@@b"), "prompt"),
        ("completions", _completion(prompt=["@@"]), "prompt[0]"),
        ("completions", _completion(model="@@"), "model"),
        ("completions", _completion(user="@@"), "user"),
        ("completions", _completion(stop=["x", "@@"]), "stop[1]"),
        ("completions", _completion(suffix="@@"), "suffix"),
        ("completions", _completion(not_a_field="@@"), "not_a_field"),
        ("completions", _completion(logit_bias={"@@": 1}), "logit_bias.@@"),
        ("chat/completions", _chat(messages=[{"role": "user", "content": "@@"}]), "messages[0].content"),
        ("chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "@@"}]}]), "messages[0].content[0].text"),
        ("chat/completions", _chat(messages=[{"role": "@@", "content": "x"}]), "messages[0].role"),
        ("chat/completions", _chat(messages=[{"role": "user", "content": "x", "name": "@@"}]), "messages[0].name"),
        ("chat/completions", _chat(user="@@"), "user"),
        ("chat/completions", _chat(model="@@"), "model"),
        ("feedback", {"id": "@@", "score": 1}, "id"),
    ],
)
@pytest.mark.parametrize("escape", [_LONE, "\\udfff", "a\\udc00b", "\\ude00\\ud83d"])
def test_lone_surrogates_are_400_naming_the_field(
    url: str, route: str, body: dict, param: str, escape: str
) -> None:
    param = param.replace("@@", escape)
    message = _error(_post_raw(url, route, _with_escape(body, "@@", escape)), 400, param, "invalid_json")
    assert "lone UTF-16 surrogate" in message and message.startswith(param)


@pytest.mark.parametrize(
    ("request_line", "headers", "status"),
    [
        (b"GET /v1/models/%ED%A0%80", b"", 404),
        (b"GET /v1/models/%ff%fe", b"", 404),
        (b"GET /v1/models/\xed\xa0\x80", b"", 400),  # refused by the HTTP parser, before the app
        (b"GET /admin/adapters/%ED%A0%80/v1", b"", 400),
        (b"GET /admin/adapters/a/%00", b"", 400),
        (b"GET /admin/adapters?task=%ED%A0%80", b"", 400),
        (b"GET /admin/rollouts/x/history?limit=%ED%A0%80", b"", 400),
        (b"POST /v1/completions", b"X-Session-Id: \xed\xa0\x80\r\n", 200),
        (b"POST /v1/completions", b"X-Canary: \xff\r\n", 200),
    ],
)
def test_malformed_paths_queries_and_headers_are_not_500(
    url: str, request_line: bytes, headers: bytes, status: int
) -> None:
    body = json.dumps(_completion(model="alpha")).encode() if request_line.startswith(b"POST") else b""
    head = (request_line + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            + headers + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")  # fmt: skip
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:300]
    if status >= 400 and b"Invalid HTTP request" not in answer:  # uvicorn's own, not the app's
        assert b'"error":{"message"' in answer, answer[:300]


def test_surrogate_pairs_and_escaped_backslashes_are_fine(url: str) -> None:
    for text in ("\\ud83d\\ude00", "\\\\ud800", "\\u00e9"):  # a pair, a literal backslash, é
        response = _post_raw(url, "completions", _with_escape(_completion(prompt="a@@"), "@@", text))
        assert response.status_code == 200, response.text


def test_surrogates_in_admin_rollout_bodies_are_400(url: str) -> None:
    raw = _with_escape({"task": "alpha", "candidate": "@@"}, "@@")
    response = httpx.post(f"{url}/admin/rollouts", content=raw, timeout=30)
    _error(response, 400, "candidate", "invalid_json")
    eval_line = json.dumps({"prompt": "@@", "answer": "x"}).replace("@@", _LONE)
    body = {"task": "alpha", "candidate": "v9", "eval_set": eval_line + "\n"}
    response = httpx.post(f"{url}/admin/rollouts", json=body, timeout=30)
    message = _error(response, 400, None, "invalid_rollout")
    assert "eval_set line 1" in message and "surrogate" in message


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"base_model_name_or_path": "@@"}, "base_model_name_or_path"),
        ({"target_modules": ["q_proj", "@@"]}, "target_modules"),
        ({"alpha_pattern": {"@@": 2}}, "alpha_pattern"),
        ({"@@": 1}, _LONE),
        ({"revision": "a@@b"}, "revision"),
    ],
    ids=["base-model", "target", "pattern-key", "key", "revision"],
)
def test_surrogates_in_an_uploaded_adapter_config_are_400(
    url: str, adapter_dir: Path, data_dir: Path, change: dict, field: str
) -> None:
    parts = adapter_parts(adapter_dir)
    config = {**json.loads(parts[0][2]), **change}
    raw = json.dumps(config).replace("@@", _LONE).encode()
    before = registry_snapshot(data_dir)
    response = upload_parts(url, "sur", "v1", [("adapter_config.json", "adapter_config.json", raw), parts[1]])
    message = _error(response, 400, f"adapter_config.json.{field}", "invalid_adapter")
    assert "lone UTF-16 surrogate" in message
    assert registry_snapshot(data_dir) == before


@pytest.mark.parametrize("route", ["completions", "chat/completions", "feedback"])
@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"[" * 100_000, "deeper than"),
        (b"[" * 100_000 + b"]" * 100_000, "deeper than"),
        (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, "deeper than"),
        (b"\xed\xa0\x80", "not valid UTF-8"),  # a surrogate encoded in UTF-8
        (b'{"model": "base", "prompt": "\xff"}', "not valid UTF-8"),
        (b'{"model": "base", "prompt": "a", "temperature": NaN}', "NaN is not a JSON number"),
        (b'{"model": "base", "prompt": "a", "top_p": -Infinity}', "Infinity is not a JSON number"),
        (b'{"model": "base", "prompt": "a", "seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b'{"model": "base", "prompt": ', "not valid JSON"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),  # a byte-order mark
        (b"", "is empty"),
        (b"   ", "is empty"),
    ],
    ids=["deep-open", "deep-closed", "deep-objects", "utf8-surrogate", "bad-utf8", "nan",
         "infinity", "huge-int", "truncated", "bom", "empty", "blank"],  # fmt: skip
)
def test_malformed_bodies_are_400(url: str, route: str, raw: bytes, needle: str) -> None:
    message = _error(_post_raw(url, route, raw), 400, None, "invalid_json")
    assert needle in message


def test_nesting_inside_a_field_is_400_naming_it(url: str) -> None:
    deep: Any = 1
    for _ in range(MAX_JSON_DEPTH):
        deep = [deep]
    _error(_post_raw(url, "completions", json.dumps(_completion(extra=deep)).encode()), 400, "extra", "invalid_json")
    fine = json.dumps(_completion(extra=[[[[1]]]])).encode()  # ignored unknown field, shallow
    assert _post_raw(url, "completions", fine).status_code == 200


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", [], None),
        ("completions", "prompt", None),
        ("completions", 12, None),
        ("completions", None, None),
        ("chat/completions", [_chat()], None),
        ("completions", _completion(prompt={"a": 1}), "prompt"),
        ("completions", _completion(model=None), "model"),
        ("completions", _completion(model=["base"]), "model"),
        ("completions", _completion(max_tokens=10**30), "max_tokens"),
        ("completions", _completion(seed=2**64), "seed"),
        ("completions", _completion(seed=-(2**64)), "seed"),
        ("completions", _completion(logprobs=-1), "logprobs"),
        ("completions", _completion(n=10**20), "n"),
        ("completions", _completion(stream_options=[1]), "stream_options"),
        ("chat/completions", _chat(messages=[None]), "messages[0]"),
        ("chat/completions", _chat(messages=[{"role": "user", "content": [None]}]), "messages[0].content"),
        ("chat/completions", _chat(top_logprobs=10**20, logprobs=True), "top_logprobs"),
        ("feedback", [], None),
        ("feedback", {"id": 5, "score": 1}, "id"),
        ("feedback", {"id": "x", "score": "1"}, "score"),
    ],
)
def test_wrong_shapes_and_out_of_range_values_are_400(url: str, route: str, body: Any, param: str | None) -> None:
    _error(_post_raw(url, route, json.dumps(body).encode()), 400, param)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "base", "prompt": "a", "max_tokens": 1e400}', "max_tokens"),
        (b'{"model": "base", "prompt": "a", "temperature": -1e400}', "temperature"),
        (b'{"model": "base", "prompt": "a", "top_p": 1e400}', "top_p"),
        (b'{"model": "base", "prompt": "a", "seed": 1.5}', "seed"),
        (b'{"model": "base", "prompt": [1e400]}', "prompt"),
    ],
)
def test_numbers_json_allows_but_fields_do_not_are_400(url: str, raw: bytes, param: str) -> None:
    _error(_post_raw(url, "completions", raw), 400, param)


@pytest.mark.parametrize(
    "fields",
    [
        {"top_k": 2**70},
        {"seed": 2**64 - 1},
        {"seed": -(2**63)},
        {"max_tokens": None},
        {"user": "u" * 100_000},
        {"stop": ["\u0000", "\u00e9", "\U0001f600", "z" * 1000]},
        {"prompt": "a\u0000\u200b\ufeff\U0010ffff"},
        {"prompt": [[0, 1, 2]]},
        {"logit_bias": {}},
        {"n": None, "best_of": 1, "echo": False, "suffix": ""},
        {"temperature": 2, "top_p": 5e-324, "top_k": 0},
    ],
)
def test_odd_but_valid_values_are_answered(url: str, fields: dict) -> None:
    response = httpx.post(f"{url}/v1/completions", json=_completion(**fields), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_non_json_content_type_is_400(url: str, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    raw = json.dumps(_completion()).encode()
    response = httpx.post(f"{url}/v1/completions", content=raw, headers=headers, timeout=30)
    assert "application/json" in _error(response, 400, None, "invalid_content_type")


def test_chat_template_refusal_is_400() -> None:
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}" + CHAT_TEMPLATE
    message = prompts.ChatMessage(role="user", content="hi")
    with pytest.raises(prompts.APIError) as info:
        prompts.chat_prompt_ids(tokenizer, [message])
    assert (info.value.status, info.value.param) == (400, "messages")
    assert "roles must alternate" in info.value.message


# ---- 3. sampling values that underflow fp32 answer greedily -----------------------------------


def _text(url: str, model: str, **sampling: Any) -> str:
    body = {"model": model, "prompt": "reverse: abc", "max_tokens": 12, "ignore_eos": True, **sampling}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.mark.parametrize("model", ["base", "alpha"])
@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1e-39},
        {"temperature": 5e-324},
        {"temperature": 1e-300},
        {"temperature": 1e-7},
        {"temperature": 1e-39, "seed": 3},
        {"top_p": 1e-300},
        {"top_p": 5e-324},
        {"top_p": 1e-46},
        {"top_p": 1e-39, "temperature": 2.0, "seed": 5},
        {"top_p": 1e-300, "top_k": 3},
    ],
)
def test_underflowing_temperature_or_top_p_answers_greedily(url: str, model: str, sampling: dict) -> None:
    greedy = _text(url, model, temperature=0)
    assert "<pad>" not in greedy
    assert _text(url, model, **sampling) == greedy


def test_chat_with_underflowing_temperature_is_greedy(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "reverse: hello"}]
    kw = {"model": "alpha", "messages": messages, "max_tokens": 10, "extra_body": {"ignore_eos": True}}
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    for temperature in (1e-39, 5e-324):
        answer = client.chat.completions.create(temperature=temperature, **kw)
        assert answer.choices[0].message.content == greedy


def test_sampler_samples_only_from_usable_probabilities() -> None:
    """A row whose scaled logits overflow (finite logits, probabilities NaN) gets its argmax."""
    logits = torch.tensor([[1e30, 3e38, -1e30, 0.0], [0.5, 0.1, 0.2, 2.0]])  # [2, V]
    params = [SamplingParams(temperature=1e-5), SamplingParams(temperature=1.0, seed=0)]
    tensors = SamplingTensors.build(params, [0, 0], logits.device)
    out = Sampler(torch.Generator().manual_seed(0))(logits, tensors)
    assert out.token_ids[0] == 1 and out.finite == [True, True]


def test_top_p_keeps_the_most_likely_token_whatever_rounds_to_zero() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))  # [3, V]
    kept = apply_top_p(logits, torch.tensor([0.0, 1e-45, 1.0]))
    assert torch.isfinite(kept[0]).sum() == 1 and kept[0].argmax() == logits[0].argmax()
    assert torch.isfinite(kept[1]).sum() == 1
    assert torch.isfinite(kept[2]).sum() > 1
    assert SamplingParams(temperature=1e-39).greedy and not SamplingParams(temperature=1e-3).greedy


# ---- 4. the OpenAPI document is the served API ------------------------------------------------


def test_openapi_lists_the_statuses_the_server_answers(url: str) -> None:
    doc = httpx.get(f"{url}/openapi.json", timeout=30).json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert set(schemas["ErrorResponse"]["properties"]) == {"error"}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            for status, entry in responses.items():
                if status.startswith(("4", "5")) and not (path == "/health" and status == "503"):
                    ref = entry["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse"), (method, path, status)
    for route in ("/v1/completions", "/v1/chat/completions"):
        operation = doc["paths"][route]["post"]
        assert {"200", "400", "401", "404", "413", "429", "500"} <= set(operation["responses"])
        assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        assert "Retry-After" in operation["responses"]["429"]["headers"]
    feedback = doc["paths"]["/v1/feedback"]["post"]
    assert {"id", "score"} <= set(feedback["requestBody"]["content"]["application/json"]["schema"]["properties"])
    upload = doc["paths"]["/admin/adapters/{task}/{version}"]["put"]
    assert {"200", "201", "400", "401", "403", "404", "409", "413", "507"} <= set(upload["responses"])
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert "201" in doc["paths"]["/admin/rollouts"]["post"]["responses"]


# ---- 5. waiting costs nothing; a full queue answers 429 before any work ------------------------


def test_full_queue_is_429_before_tokenizing(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flags = {"served_model_name": "base", "max_num_seqs": 1, "max_waiting": 2}
    long = _completion(prompt="abc", max_tokens=LONG_CONTEXT - 16, ignore_eos=True)
    with running_server(model_dir, **flags) as base, httpx.Client(timeout=60) as client:
        waiting = []
        try:
            for n in range(3):  # one runs, two wait
                waiting.append(_background(client, base, long))
                assert wait_for(lambda n=n: _queue(base) == (1, n), timeout=20), engine_stats(base)
            calls = []
            real = prompts.completion_prompts
            monkeypatch.setattr(prompts, "completion_prompts", lambda *a: calls.append(a) or real(*a))
            for body in (_completion(), _completion(prompt="x" * 50_000), _completion(stream=True)):
                response = client.post(f"{base}/v1/completions", json=body)
                _error(response, 429, None, "queue_full")
                assert response.headers["retry-after"] == "1"
            assert calls == [], "a refused request was tokenized"
        finally:
            for stop in waiting:
                stop.set()
        assert wait_for(lambda: _queue(base) == (0, 0), timeout=20), engine_stats(base)


def test_a_waiting_request_whose_client_left_leaves_the_queue(model_dir: Path) -> None:
    flags = {"served_model_name": "base", "max_num_seqs": 1}
    long = _completion(prompt="abc", max_tokens=LONG_CONTEXT - 16, ignore_eos=True)
    with running_server(model_dir, **flags) as base, httpx.Client(timeout=60) as client:
        running = _background(client, base, long)
        try:
            assert wait_for(lambda: _queue(base) == (1, 0), timeout=20), engine_stats(base)
            with pytest.raises(httpx.ReadTimeout):  # waits behind the running one, then leaves
                httpx.post(f"{base}/v1/completions", json=long, timeout=httpx.Timeout(60, read=1.0))
            assert wait_for(lambda: _queue(base) == (1, 0), timeout=5), engine_stats(base)
        finally:
            running.set()


def _queue(url: str) -> tuple[int, int]:
    stats = engine_stats(url)
    return stats["num_running"], stats["num_waiting"]


def _background(client: httpx.Client, url: str, body: dict) -> threading.Event:
    """A streamed completion in a thread, read until the returned event is set (then closed)."""
    stop = threading.Event()

    def run() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threading.Thread(target=run, daemon=True).start()
    return stop


# ---- 6. model cards reveal no server path ------------------------------------------------------


def test_model_cards_show_no_server_path(
    url: str, model_dir: Path, adapter_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    other = make_peft_adapter(model_dir, tmp_path / "alpha-v2", seed=7, std=0.3)
    response = upload_parts(url, "alpha", "v2", adapter_parts(other))
    assert response.status_code in (200, 201), response.text
    sha = response.json()["sha256"]
    listed = httpx.get(f"{url}/v1/models", timeout=30)
    assert str(data_dir) not in listed.text and str(adapter_dir) not in listed.text
    assert str(model_dir) not in listed.text
    cards = {card["id"]: card for card in listed.json()["data"]}
    assert cards["alpha@v2"]["root"] == f"sha256:{sha}"
    for card in cards.values():
        assert "/" not in card["root"] and "\\" not in card["root"], card
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", cards["alpha"]["root"])
    single = httpx.get(f"{url}/v1/models/alpha@v2", timeout=30).json()
    assert single["root"] == f"sha256:{sha}"
