"""Admin authentication: 401 without the token, 403 with a wrong one, and nothing changes;
without a configured token, only loopback clients get in."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI

from peftserve.api import admin
from peftserve.api.errors import install_error_handlers
from tests.server_utils import adapter_parts, registry_snapshot, running_server, upload_parts
from tests.tiny_models import make_peft_adapter, make_tiny_model

TOKEN = "s3cret-admin"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), "qwen2")


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(model_dir, tmp_path_factory.mktemp("adapters") / "alpha", std=0.3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def url(model_dir: Path, adapter_dir: Path, data_dir: Path) -> Iterator[str]:
    with running_server(
        model_dir, {"alpha": adapter_dir}, data_dir=str(data_dir), admin_token=TOKEN
    ) as base_url:
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert upload_parts(base_url, "alpha", "v2", adapter_parts(adapter_dir), good).status_code == 201
        yield base_url


def _state(url: str, data_dir: Path) -> tuple[dict, list]:
    """The store and every version's tier (read with the right token)."""
    listed = httpx.get(f"{url}/admin/adapters", headers={"Authorization": f"Bearer {TOKEN}"})
    assert listed.status_code == 200
    return registry_snapshot(data_dir), [(a["id"], a["status"]) for a in listed.json()["data"]]


ACTIONS = {
    "upload": lambda url, h, parts: upload_parts(url, "newtask", "v1", parts, h),
    "delete": lambda url, h, parts: httpx.delete(f"{url}/admin/adapters/alpha/v2", headers=h),
    "load": lambda url, h, parts: httpx.post(f"{url}/admin/adapters/alpha/v2/load", headers=h),
    "unload": lambda url, h, parts: httpx.post(f"{url}/admin/adapters/alpha/v2/unload", headers=h),
    "list": lambda url, h, parts: httpx.get(f"{url}/admin/adapters", headers=h),
    "vllm-load": lambda url, h, parts: httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "newtask", "lora_path": "/x"}, headers=h
    ),
    "vllm-unload": lambda url, h, parts: httpx.post(
        f"{url}/v1/unload_lora_adapter", json={"lora_name": "alpha"}, headers=h
    ),
}


@pytest.mark.parametrize("action", sorted(ACTIONS))
@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_admin_token"),
        ({"Authorization": "Bearer wrong"}, 403, "forbidden"),
        ({"Authorization": f"Basic {TOKEN}"}, 403, "forbidden"),
    ],
)
def test_admin_needs_the_token_and_changes_nothing(
    url: str, data_dir: Path, adapter_dir: Path, action: str, headers: dict, status: int, code: str
) -> None:
    before = _state(url, data_dir)
    response = ACTIONS[action](url, headers, adapter_parts(adapter_dir))
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    assert _state(url, data_dir) == before


def test_the_right_token_gets_in_and_inference_needs_no_admin_token(url: str) -> None:
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(f"{url}/admin/adapters/alpha/v2/load", headers=good).json()["status"] == "gpu"
    body = {"model": "alpha@v2", "prompt": "abc", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200


def _bare_admin_app(token: str) -> FastAPI:
    app = FastAPI()
    app.state.serving = SimpleNamespace(admin_token=token, adapters=None, max_request_bytes=1 << 20)
    install_error_handlers(app)
    app.include_router(admin.router)
    app.include_router(admin.vllm_router)
    return app


@pytest.mark.parametrize(
    ("client", "status"),
    [("10.1.2.3", 403), ("192.168.0.9", 403), ("127.0.0.1", 503), ("::1", 503), ("::ffff:127.0.0.1", 503)],
)
def test_without_a_token_admin_answers_loopback_only(client: str, status: int) -> None:
    """503 'no registry' means the request got past authentication."""

    async def get() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=_bare_admin_app(""), client=(client, 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as http:
            body = {"lora_name": "a", "lora_path": "/a"}
            return [await http.get("/admin/adapters"), await http.post("/v1/load_lora_adapter", json=body)]

    for response in asyncio.run(get()):
        assert response.status_code == status, response.text
        if status == 403:
            assert "--admin-token" in response.json()["error"]["message"]
