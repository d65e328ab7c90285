"""peftserve.Client and peftserve.AsyncClient against a live server (admin token and API key on)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import peftserve
from peftserve.client import (
    Adapter,
    AsyncClient,
    ChatCompletion,
    ChatCompletionChunk,
    Client,
    Completion,
    CompletionChunk,
    PeftserveError,
)
from tests.server_utils import running_server
from tests.tiny_models import make_peft_adapter, make_tiny_model

TOKEN, KEY = "admin-tok", "api-key"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), "llama")


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "one": make_peft_adapter(model_dir, root / "one", std=0.3),
        "two": make_peft_adapter(model_dir, root / "two", r=8, seed=7, std=0.3),
    }


@pytest.fixture(scope="module")
def url(model_dir: Path) -> Iterator[str]:
    with running_server(model_dir, served_model_name="base", admin_token=TOKEN, api_key=[KEY]) as u:
        yield u


@pytest.fixture
def client(url: str) -> Iterator[Client]:
    with Client(url, admin_token=TOKEN, api_key=KEY) as c:
        yield c


def test_import_peftserve_stays_light() -> None:
    code = "import sys, peftserve; assert 'httpx' not in sys.modules and 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    assert peftserve.Client is Client and peftserve.AsyncClient is AsyncClient


def test_adapter_methods(client: Client, adapters: dict[str, Path]) -> None:
    sent: list[int] = []
    first = client.upload(adapters["one"], "sync", "v1", progress=sent.append)
    assert isinstance(first, Adapter) and first.ref == "sync@v1" and first.stable
    assert sum(sent) == sum(p.stat().st_size for p in adapters["one"].iterdir()
                            if p.name.startswith("adapter_"))  # fmt: skip
    second = client.register(adapters["two"], "sync", "v2")
    assert not second.stable and second.rank == 8
    assert [a.ref for a in client.list("sync")] == ["sync@v1", "sync@v2"]
    assert client.show("sync", "v2") == second
    task = client.task("sync")
    assert task.stable == "v1" and [v.version for v in task.versions] == ["v1", "v2"]
    assert client.load("sync", "v2").status == "gpu"
    assert client.unload("sync", "v2").status == "cpu"
    deleted = client.delete("sync", "v2")
    assert deleted.ref == "sync@v2" and deleted.status == "deleted"
    assert [a.ref for a in client.list("sync")] == ["sync@v1"]


def test_inference_methods(client: Client, adapters: dict[str, Path]) -> None:
    client.upload(adapters["one"], "infer", "v1")
    ids = [m.id for m in client.models()]
    assert ids[0] == "base" and {"infer", "infer@v1"} <= set(ids)
    params = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    done = client.completion("infer", "abc", **params)
    assert isinstance(done, Completion) and done.usage.completion_tokens == 6
    chunks = list(client.completion_stream("infer", "abc", stream_options={"include_usage": True}, **params))
    assert all(isinstance(c, CompletionChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == done.text and chunks[-1].usage.completion_tokens == 6
    chat = client.chat_completion("infer@v1", MESSAGES, **params)
    assert isinstance(chat, ChatCompletion) and chat.role == "assistant" and chat.finish_reason == "length"
    pieces = list(client.chat_completion_stream("infer@v1", MESSAGES, **params))
    assert all(isinstance(c, ChatCompletionChunk) for c in pieces) and pieces[0].role == "assistant"
    assert "".join(c.content for c in pieces) == chat.content
    assert client.health()["status"] == "ok"


def test_errors_carry_status_and_message(client: Client, url: str, tmp_path: Path) -> None:
    with pytest.raises(PeftserveError) as info:
        client.show("nope", "v1")
    assert (info.value.status, info.value.code) == (404, "not_found")
    assert "nope@v1" in info.value.message and info.value.type == "invalid_request_error"
    with pytest.raises(PeftserveError) as info:
        client.completion("nope", "abc")
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")
    with pytest.raises(PeftserveError) as info:
        list(client.completion_stream("nope", "abc"))
    assert info.value.status == 404
    with Client(url, admin_token="wrong", api_key="wrong") as bad, pytest.raises(PeftserveError) as info:
        bad.list()
    assert info.value.status == 403
    with Client(url, admin_token=TOKEN, api_key="wrong") as bad, pytest.raises(PeftserveError) as info:
        bad.models()
    assert info.value.status == 401
    with pytest.raises(FileNotFoundError, match="safetensors"):
        client.upload(tmp_path, "empty", "v1")
    with Client("http://127.0.0.1:9", timeout=5) as nowhere, pytest.raises(PeftserveError) as info:
        nowhere.list()
    assert info.value.status == 0 and "cannot reach" in info.value.message


def test_async_client(url: str, adapters: dict[str, Path]) -> None:
    params = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}

    async def run() -> None:
        async with AsyncClient(url, admin_token=TOKEN, api_key=KEY) as client:
            adapter = await client.upload(adapters["two"], "async", "v1")
            assert adapter.stable and adapter.ref == "async@v1"
            assert await client.register(adapters["one"], "async", "v2")
            assert [a.version for a in await client.list("async")] == ["v1", "v2"]
            assert (await client.show("async", "v1")).sha256 == adapter.sha256
            assert (await client.task("async")).stable == "v1"
            assert (await client.load("async", "v2")).status == "gpu"
            assert (await client.unload("async", "v2")).status == "cpu"
            assert (await client.delete("async", "v2")).ref == "async@v2"
            assert "async" in [m.id for m in await client.models()]
            done = await client.completion("async", "abc", **params)
            chunks = [c async for c in client.completion_stream("async", "abc", **params)]
            assert "".join(c.text for c in chunks) == done.text
            chat = await client.chat_completion("async", MESSAGES, **params)
            pieces = [c async for c in client.chat_completion_stream("async", MESSAGES, **params)]
            assert "".join(c.content for c in pieces) == chat.content
            assert (await client.health())["status"] == "ok"
            with pytest.raises(PeftserveError) as info:
                await client.delete("async", "v1")
            assert (info.value.status, info.value.code) == (409, "conflict")

    asyncio.run(run())
