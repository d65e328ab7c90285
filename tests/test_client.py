"""peftserve.Client and peftserve.AsyncClient against a live server (admin token and API key on)."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
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
    assert client.show("sync", "v2") == second == client.show("sync@v2")
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
    chunks = list(client.completion_stream("infer", "abc", include_usage=True, **params))
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
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        client.upload(tmp_path, "empty", "v1")
    with Client(url, admin_token="", api_key=KEY) as tokenless, pytest.raises(PeftserveError) as info:
        tokenless.list()
    assert info.value.status == 401 and "pass admin_token= to the client or set PEFTSERVE_ADMIN_TOKEN" in str(info.value)
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


def test_completion_says_what_served_it(client: Client, adapters: dict[str, Path]) -> None:
    """``served_by`` and ``arm`` from the response headers: stable, a pinned other version, the base."""
    client.upload(adapters["one"], "said", "v1")
    client.upload(adapters["two"], "said", "v2")
    params = {"max_tokens": 2, "temperature": 0}
    stable = client.completion("said", "abc", **params)
    assert (stable.served_by, stable.arm) == ("said@v1", "stable")
    pinned = client.completion("said@v2", "abc", **params)
    assert (pinned.served_by, pinned.arm) == ("said@v2", "pinned")
    base = client.chat_completion("base", MESSAGES, **params)
    assert (base.served_by, base.arm) == ("base", "stable")
    chunks = list(client.completion_stream("said@v2", "abc", **params))
    assert {(c.served_by, c.arm) for c in chunks} == {("said@v2", "pinned")}


def test_one_request_builder_serves_both_clients() -> None:
    """Every public call is one ``_Api`` endpoint, bound by Client and AsyncClient alike."""
    from peftserve.client import _Api, endpoint

    calls = {name for name, value in vars(_Api).items() if isinstance(value, endpoint)}
    assert {"upload", "show", "start_rollout", "completion", "chat_completion_stream"} <= calls
    sync, asynchronous = Client("127.0.0.1:1"), AsyncClient("127.0.0.1:1")
    for client, own in ((sync, {"close"}), (asynchronous, {"aclose"})):
        public = {name for name in dir(client) if not name.startswith("_") and callable(getattr(client, name))}
        assert public == calls | own, type(client)
    assert inspect.signature(sync.start_rollout) == inspect.signature(asynchronous.start_rollout)
    assert "interval" in inspect.signature(sync.start_rollout).parameters
    assert inspect.iscoroutinefunction(asynchronous.show)
    assert inspect.isasyncgen(asynchronous.completion_stream("m", "p"))
    assert sync.base_url == "http://127.0.0.1:1"  # HOST:PORT means http
    sync.close()


def _sent(call: Any) -> httpx.Request:
    """The request ``call(client)`` sends (answered 400, so the call raises)."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(400, json={"error": {"message": "stop"}})

    transport = httpx.MockTransport(answer)
    with Client("http://peftserve.test", transport=transport) as client, pytest.raises(PeftserveError, match="stop"):
        call(client)
    return seen[0]


def test_arguments_as_the_cli_names_them(tmp_path: Path) -> None:
    evals = tmp_path / "eval.jsonl"
    evals.write_text('{"prompt": "a", "answer": "b"}\n')
    sent = _sent(lambda c: c.start_rollout("reverse", "v2", steps="10, 50", interval=20, min_samples=30,
                                           eval_set=evals, target_header="x-tier=internal,beta"))  # fmt: skip
    assert (sent.method, sent.url.path) == ("POST", "/admin/rollouts")
    assert json.loads(sent.content) == {
        "task": "reverse", "candidate": "v2", "steps": [10.0, 50.0], "step_interval_s": 20,
        "targeting": [{"header": "x-tier", "values": ["internal", "beta"], "op": "in"}],
        "analysis": {"min_samples": 30}, "eval_set": evals.read_text(),
    }  # fmt: skip
    listed = _sent(lambda c: c.start_rollout("t", "v2", steps=[5, 25], eval_set=[{"prompt": "p", "answer": "q"}]))
    assert json.loads(listed.content)["eval_set"] == '{"prompt": "p", "answer": "q"}\n'
    assert _sent(lambda c: c.show("reverse@v2")).url.path == "/admin/adapters/reverse/v2"
    assert _sent(lambda c: c.unload("reverse", "v2")).url.path == "/admin/adapters/reverse/v2/unload"
    body = json.loads(_sent(lambda c: c.completion("reverse", "p", max_tokens=3, extra={"echo": True})).content)
    assert body == {"model": "reverse", "prompt": "p", "max_tokens": 3, "echo": True}

    with Client("http://peftserve.test") as client:
        for steps, message in (("10,abc", "step 2 is 'abc'"), ([10, None], "step 2 is None"),
                               (10, "not 10"), ("10;20", "step 1 is '10;20'")):  # fmt: skip
            with pytest.raises(ValueError, match=re.escape(message)):
                client.start_rollout("t", "v2", steps=steps)
        with pytest.raises(ValueError, match="HEADER=VALUE"):
            client.start_rollout("t", "v2", target_header="x-tier")
        with pytest.raises(FileNotFoundError, match="eval set file .* does not exist"):
            client.start_rollout("t", "v2", eval_set=tmp_path / "none.jsonl")
        with pytest.raises(TypeError, match="step_interval_s"):
            client.start_rollout("t", "v2", step_interval_s=20)
        for ref in ("reverse", "reverse@", "@v2", "a@b@c"):
            with pytest.raises(ValueError, match="TASK@VERSION"):
                client.show(ref)


def test_cli_token_flag_and_missing_token_message(url: str, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from peftserve.cli import main

    monkeypatch.delenv("PEFTSERVE_ADMIN_TOKEN", raising=False)
    assert main(["adapters", "list", "--server", url]) == 1
    err = capsys.readouterr().err
    assert "this server needs its admin token: pass --token TOKEN or set PEFTSERVE_ADMIN_TOKEN (HTTP 401)" in err
    assert main(["adapters", "list", "--server", url, "--token", TOKEN]) == 0
    assert capsys.readouterr().out.startswith("TASK")
    monkeypatch.setenv("PEFTSERVE_ADMIN_TOKEN", TOKEN)
    assert main(["rollout", "status", "--server", url]) == 0
