"""Every API error over real HTTP: status, OpenAI error shape, type, param and message."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from peftserve.api import prompts
from tests.server_utils import engine_stats, running_server, wait_for
from tests.tiny_models import make_peft_adapter, make_tiny_model

MAX_MODEL_LEN = 64
"""The context of the shared server (--max-model-len); the model itself holds LONG + 64."""
LONG = 8000
"""A generation budget that keeps the tiny model busy for 10+ s."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("model"), "qwen2", max_position_embeddings=LONG + 64
    )


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(model_dir, tmp_path_factory.mktemp("adapters") / "alpha")


@pytest.fixture(scope="module")
def url(model_dir: Path, adapter_dir: Path) -> Iterator[str]:
    adapters = {"alpha": adapter_dir}
    with running_server(
        model_dir, adapters, served_model_name="base", max_model_len=MAX_MODEL_LEN
    ) as u:
        yield u


def _error(response: httpx.Response, status: int, type_: str, param: str | None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == (type_, param), error
    assert error["message"] and "Traceback" not in error["message"]
    assert response.headers["x-request-id"]
    return error


def _post(url: str, route: str, body: object, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/{route}", json=body, timeout=60, **kw)


def _completion(**fields) -> dict:
    return {"model": "base", "prompt": "abc", "max_tokens": 2, **fields}


def _chat(**fields) -> dict:
    return {
        "model": "alpha",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        **fields,
    }


# ---- 400: invalid parameters ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"n": 0}, "n", "n must be in 1.."),
        ({"n": 10**6}, "n", "max_num_seqs"),
        ({"temperature": 2.5}, "temperature", "temperature must be in [0, 2]"),
        ({"temperature": "hot"}, "temperature", "temperature"),
        ({"top_p": 0}, "top_p", "top_p must be in (0, 1]"),
        ({"top_k": -5}, "top_k", "top_k"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
        ({"logprobs": 50}, "logprobs", "logprobs must be in 0..20"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"n": 3, "best_of": 2}, "best_of", "at least n"),
        ({"best_of": 3, "stream": True}, "best_of", "stream"),
        ({"suffix": "x"}, "suffix", "not supported"),
        ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
        ({"repetition_penalty": 0}, "repetition_penalty", "above 0"),
        ({"logit_bias": {"x": 10}}, "logit_bias", "token ids"),
        ({"logit_bias": {"-5": 10}}, "logit_bias", "token ids"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": {"99999": 1}}, "logit_bias", "token ids must be in"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
        ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
        ({"guided_json": {"type": "object"}}, "guided_json", "not supported"),
        ({"use_beam_search": True}, "use_beam_search", "not supported"),
        ({"skip_special_tokens": False}, "skip_special_tokens", "not supported"),
        ({"prompt_logprobs": 1}, "prompt_logprobs", "not supported"),
        ({"bad_words": ["ab"]}, "bad_words", "not supported"),
        ({"prompt": ["a", ""]}, "prompt[1]", "empty"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": [1, 99999]}, "prompt", "out of range"),
        ({"prompt": 5}, "prompt", "prompt"),
        ({"seed": "x"}, "seed", "seed"),
    ],
)
def test_completion_invalid_parameter(url: str, fields: dict, param: str, needle: str) -> None:
    error = _error(
        _post(url, "completions", _completion(**fields)), 400, "invalid_request_error", param
    )
    assert needle in error["message"]


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"n": 10**6}, "n", "max_num_seqs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ({"tool_choice": "required"}, "tool_choice", "not supported"),
        ({"functions": [{"name": "f"}]}, "functions", "not supported"),
        ({"function_call": {"name": "f"}}, "function_call", "not supported"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "json_schema",
        ),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "not supported"),
        ({"continue_final_message": True}, "continue_final_message", "not supported"),
        ({"chat_template": "{{ x }}"}, "chat_template", "not supported"),
        ({"echo": True}, "echo", "not supported"),
        ({"modalities": ["text", "audio"]}, "modalities", "not supported"),
        ({"top_logprobs": 2}, "top_logprobs", "requires logprobs"),
        ({"logprobs": True, "top_logprobs": 30}, "top_logprobs", "0..20"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must be"),
        ({"messages": []}, "messages", "at least one"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "must be one of"),
        ({"messages": [{"role": "user"}, {"content": "x"}]}, "messages[1].role", "Field required"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
            "not supported",
        ),
        ({"messages": "hi"}, "messages", "messages"),
    ],
)
def test_chat_invalid_parameter(url: str, fields: dict, param: str, needle: str) -> None:
    error = _error(
        _post(url, "chat/completions", _chat(**fields)), 400, "invalid_request_error", param
    )
    assert needle in error["message"]


def test_missing_required_fields(url: str) -> None:
    body = {"prompt": "abc"}
    error = _error(_post(url, "completions", body), 400, "invalid_request_error", "model")
    assert "Field required" in error["message"]
    body = {"model": "base"}
    _error(_post(url, "chat/completions", body), 400, "invalid_request_error", "messages")


def test_malformed_json_is_400(url: str) -> None:
    response = httpx.post(
        f"{url}/v1/completions", content=b'{"model": "base", "prompt": ', timeout=30,
        headers={"content-type": "application/json"},
    )  # fmt: skip
    error = _error(response, 400, "invalid_request_error", None)
    assert "not valid JSON" in error["message"]


def test_body_that_is_not_an_object_is_400(url: str) -> None:
    error = _error(_post(url, "completions", ["abc"]), 400, "invalid_request_error", None)
    assert "JSON object" in error["message"]


def test_prompt_longer_than_context(url: str) -> None:
    long_prompt = "a" * (MAX_MODEL_LEN + 5)
    error = _error(
        _post(url, "completions", _completion(prompt=long_prompt)),
        400,
        "invalid_request_error",
        "prompt",
    )
    assert f"maximum context length is {MAX_MODEL_LEN}" in error["message"]
    assert error["code"] == "context_length_exceeded"
    messages = [{"role": "user", "content": long_prompt}]
    _error(
        _post(url, "chat/completions", _chat(messages=messages)),
        400,
        "invalid_request_error",
        "messages",
    )


def test_prompt_plus_max_tokens_longer_than_context(url: str) -> None:
    response = _post(url, "completions", _completion(prompt="abcd", max_tokens=MAX_MODEL_LEN))
    error = _error(response, 400, "invalid_request_error", "max_tokens")
    assert f"maximum context length is {MAX_MODEL_LEN}" in error["message"]
    response = _post(url, "chat/completions", _chat(max_completion_tokens=MAX_MODEL_LEN))
    _error(response, 400, "invalid_request_error", "max_completion_tokens")


def test_no_max_tokens_fills_the_context(url: str) -> None:
    response = _post(url, "chat/completions", _chat(max_tokens=None, ignore_eos=True))
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["total_tokens"] == MAX_MODEL_LEN


def test_openai_client_sees_bad_request(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )  # fmt: skip
    assert info.value.param == "tools" and info.value.type == "invalid_request_error"


# ---- 404 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_unknown_model_is_404(url: str, route: str) -> None:
    body = _completion(model="nope") if route == "completions" else _chat(model="nope")
    error = _error(_post(url, route, body), 404, "invalid_request_error", "model")
    assert error["code"] == "model_not_found" and "`nope` does not exist" in error["message"]


def test_unknown_model_with_openai_client(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_unknown_route_is_404_in_openai_shape(url: str) -> None:
    error = _error(httpx.get(f"{url}/v1/nothing-here"), 404, "invalid_request_error", None)
    assert error["code"] == "not_found"


# ---- 500 -----------------------------------------------------------------------------------


def test_internal_error_is_generic_500(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(prompts, "completion_prompts", boom)
    response = _post(url, "completions", _completion())
    error = _error(response, 500, "server_error", None)
    assert "secret" not in response.text and "Traceback" not in response.text
    assert response.headers["x-request-id"] in error["message"]
    assert response.headers["x-request-id"].startswith("cmpl-")


# ---- 401 -----------------------------------------------------------------------------------


def test_api_keys(model_dir: Path) -> None:
    with running_server(model_dir, served_model_name="base", api_key=["k1", "k2"]) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}):
            response = _post(url, "completions", _completion(), headers=headers)
            error = _error(response, 401, "invalid_request_error", None)
            assert error["code"] == "invalid_api_key" and "API key" in error["message"]
        _error(httpx.get(f"{url}/v1/models", timeout=10), 401, "invalid_request_error", None)
        for key in ("k1", "k2"):
            response = _post(
                url, "completions", _completion(), headers={"Authorization": f"Bearer {key}"}
            )
            assert response.status_code == 200, response.text
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()
        assert openai.OpenAI(base_url=f"{url}/v1", api_key="k2").models.list().data


# ---- 429 -----------------------------------------------------------------------------------


def test_full_queue_is_429_with_retry_after(model_dir: Path) -> None:
    flags = {"served_model_name": "base", "max_num_seqs": 1, "max_waiting": 1}
    with running_server(model_dir, **flags) as url:
        long = _completion(max_tokens=LONG, ignore_eos=True, stream=True)
        streams = [_open_stream(url, long)]
        try:  # the first must be running before the second queues, or the second is refused
            assert wait_for(lambda: _queue(url) == (1, 0), timeout=10), engine_stats(url)
            streams.append(_open_stream(url, long))
            assert wait_for(lambda: _queue(url) == (1, 1), timeout=10), engine_stats(url)
            for route, body in (
                ("completions", _completion()),
                ("completions", _completion(stream=True)),
                ("chat/completions", _chat(model="base")),
            ):
                response = _post(url, route, body)
                error = _error(response, 429, "rate_limit_exceeded", None)
                assert response.headers["retry-after"] == "1"
                assert error["code"] == "queue_full" and "retry" in error["message"]
        finally:
            for stop in streams:
                stop.set()
        assert wait_for(lambda: _queue(url) == (0, 0), timeout=10)


def _queue(url: str) -> tuple[int, int]:
    stats = engine_stats(url)
    return stats["num_running"], stats["num_waiting"]


def _open_stream(url: str, body: dict) -> threading.Event:
    """Start a streaming request in a thread; it reads until the returned event is set."""
    stop = threading.Event()

    def run() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    threading.Thread(target=run, daemon=True).start()
    return stop
