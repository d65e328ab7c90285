"""API pieces without a server: error mapping, model table, prompt checks, chunk shapes."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from starlette.requests import ClientDisconnect

from peftserve.api.errors import validation_error
from peftserve.api.generation import OutputStream, cancel_on_disconnect
from peftserve.api.prompts import context_max_tokens, reject_unsupported, sampling_params
from peftserve.api.schemas import ChatCompletionRequest, CompletionRequest, Usage
from peftserve.api.streaming import (
    ChatChunker,
    CompletionChunker,
    SSEResponse,
    StreamInfo,
    completion_logprobs,
    sse_body,
    sse_event,
)
from peftserve.engine.outputs import RequestOutput, TokenLogprob
from peftserve.server.errors import APIError, ClientDisconnected
from peftserve.server.model_table import ModelTable


def _out(text: str, finished: bool = False, reason: str | None = None) -> RequestOutput:
    return RequestOutput("r", text, [1], None, finished, reason, 3, 1)


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "temperature"), "temperature"),
        (("body", "messages", 0, "content"), "messages[0].content"),
        (("body", "prompt", "str"), "prompt"),
        (("body", "prompt", "list[int]", 1), "prompt[1]"),
        (("body",), None),
    ],
)
def test_validation_error_names_the_field(loc: tuple, param: str | None) -> None:
    error = validation_error([{"type": "x", "loc": loc, "msg": "bad"}])
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)


def test_invalid_json_error() -> None:
    error = validation_error([{"type": "json_invalid", "loc": ("body", 12), "msg": "x"}])
    assert error.param is None and error.code == "invalid_json"


def test_model_table() -> None:
    table = ModelTable("base", "/m", 128)
    table.add_version("a", "v1", "/a")
    table.set_stable("a", "v1")
    assert table.resolve("base").lora_id is None and table.resolve("a").lora_id == "a@v1"
    with pytest.raises(APIError) as info:
        table.resolve("b")
    assert (info.value.status, info.value.code, info.value.param) == (
        404,
        "model_not_found",
        "model",
    )
    with pytest.raises(ValueError, match="unique"):
        table.add_version("base", "v1", "/x")
    assert [(c.id, c.parent, c.root) for c in table.cards()] == [
        ("base", None, "/m"),
        ("a", "base", "/a"),
        ("a@v1", "base", "/a"),
    ]


def test_context_limits() -> None:
    assert context_max_tokens(10, None, 64, "prompt") == 54
    assert context_max_tokens(10, 54, 64, "prompt") == 54
    with pytest.raises(APIError) as info:
        context_max_tokens(10, 55, 64, "prompt")
    assert info.value.param == "max_tokens"
    with pytest.raises(APIError) as info:
        context_max_tokens(64, 1, 64, "messages")
    assert info.value.param == "messages"


def test_sampling_params_from_body() -> None:
    body = CompletionRequest(model="m", prompt="p", stop="x", top_k=5, seed=3, ignore_eos=True)
    params = sampling_params(body, 7, 2)
    assert (params.max_tokens, params.stop, params.top_k, params.seed) == (7, ["x"], 5, 3)
    assert (params.temperature, params.top_p, params.logprobs, params.ignore_eos) == (
        1.0,
        1.0,
        2,
        True,
    )
    with pytest.raises(APIError) as info:
        sampling_params(
            ChatCompletionRequest(model="m", messages=[]), 0, None, "max_completion_tokens"
        )
    assert info.value.param == "max_completion_tokens"


def test_unknown_fields_ignored_known_unsupported_rejected() -> None:
    body = CompletionRequest.model_validate({"model": "m", "prompt": "p", "whatever": 1})
    reject_unsupported(body)
    reject_unsupported(CompletionRequest(model="m", prompt="p", n=2, best_of=3, echo=True))
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    with pytest.raises(APIError) as info:
        reject_unsupported(CompletionRequest(model="m", prompt="p", response_format=schema))
    assert info.value.param == "response_format" and "json_schema" in info.value.message


def test_completion_logprobs_offsets() -> None:
    items = [
        TokenLogprob("ab", -0.1, {"ab": -0.1}),
        TokenLogprob("c", -1.0, {"c": -1.0, "d": -2.0}),
    ]
    lp = completion_logprobs(items, offset=5)
    assert lp.tokens == ["ab", "c"] and lp.token_logprobs == [-0.1, -1.0]
    assert lp.text_offset == [5, 7] and lp.top_logprobs[1] == {"c": -1.0, "d": -2.0}


def _events(chunks, include_usage: bool) -> list[dict]:
    return [json.loads(sse_event(c, include_usage)[len("data: ") :]) for c in chunks]


def test_chat_chunk_shapes() -> None:
    chunker = ChatChunker(StreamInfo("chatcmpl-1", "m", 1, include_usage=False, logprobs=False))
    chunks = (
        chunker.start() + chunker.on_output(_out("hi")) + chunker.on_output(_out("", True, "stop"))
    )
    events = _events(chunks, include_usage=False)
    assert [e["choices"][0]["delta"] for e in events] == [
        {"role": "assistant", "content": ""},
        {"content": "hi"},
        {},
    ]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, "stop"]
    assert all("usage" not in e and e["object"] == "chat.completion.chunk" for e in events)


def test_completion_chunk_shapes_with_usage() -> None:
    chunker = CompletionChunker(StreamInfo("cmpl-1", "m", 1, include_usage=True, logprobs=False))
    chunks = (
        chunker.on_output(_out("a")) + chunker.on_output(_out("")) + [chunker.usage(Usage.of(3, 1))]
    )
    events = _events(chunks, include_usage=True)
    assert len(events) == 2  # an empty, unfinished output sends nothing
    assert events[0]["usage"] is None and events[0]["choices"][0]["text"] == "a"
    assert events[1]["choices"] == [] and events[1]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 1,
        "total_tokens": 4,
    }


class _Closed:
    """An engine output iterator and a tracker: records whether the request was closed and finished."""

    def __init__(self) -> None:
        self.aborted = self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        return _out("b")

    async def aclose(self) -> None:
        self.aborted = True

    def on_output(self, out: RequestOutput) -> None:
        pass

    def close(self) -> None:
        self.finished = True


def test_a_stream_whose_client_left_before_the_first_chunk_is_closed() -> None:
    engine = _Closed()
    stream = OutputStream(_out("a"), engine, engine)
    info = StreamInfo("cmpl-1", "m", 1, include_usage=False, logprobs=False)
    response = SSEResponse(sse_body([stream], CompletionChunker(info), info), streams=[stream])

    async def send(message: dict) -> None:
        raise OSError("client gone")  # before the body iterator ever started

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    with pytest.raises(ClientDisconnect):
        asyncio.run(response(scope, receive, send))
    assert engine.aborted and engine.finished


def test_a_stream_opened_as_the_client_left_is_closed() -> None:
    engine = _Closed()

    async def go() -> None:
        async def open_stream() -> tuple[OutputStream, str]:
            return OutputStream(_out("a"), engine, engine), "target"

        async def receive() -> dict:  # the open finishes in the step the disconnect is seen
            return {"type": "http.disconnect"}

        request = SimpleNamespace(receive=receive, state=SimpleNamespace(request_id="r"))
        with pytest.raises(ClientDisconnected):
            await cancel_on_disconnect(request, open_stream())  # type: ignore[arg-type]

    asyncio.run(go())
    assert engine.aborted and engine.finished
