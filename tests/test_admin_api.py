"""The admin API over real HTTP: uploads, stable versions and pins, delete, load/unload, and
every bad upload refused with its reason and the store left exactly as it was."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.server_utils import adapter_parts, registry_snapshot, running_server, upload_parts
from tests.tiny_models import make_peft_adapter, make_tiny_model

MAX_ADAPTER_BYTES = 64 * 1024
"""The server's upload limit here: far above the tiny adapters (~10 KiB), far below 1 MiB."""
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), "llama")


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_peft_adapter(model_dir, root / "alpha", r=4, seed=1, std=0.3),
        "one": make_peft_adapter(model_dir, root / "one", r=4, seed=2, std=0.3),
        "two": make_peft_adapter(model_dir, root / "two", r=8, seed=3, std=0.3,
                                 target_modules=["q_proj", "o_proj"]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def url(model_dir: Path, adapters: dict[str, Path], data_dir: Path) -> Iterator[str]:
    startup = {"alpha": adapters["alpha"]}
    with running_server(
        model_dir, startup, served_model_name="base", data_dir=str(data_dir),
        max_adapter_bytes=MAX_ADAPTER_BYTES,
    ) as base_url:  # fmt: skip
        yield base_url


def _models(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]


def _complete(url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "abc", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def _error(response: httpx.Response, status: int, code: str, *needles: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert set(error) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in error["message"], error["message"]


# ---- uploads that succeed --------------------------------------------------------------------


def test_upload_serves_first_version_as_stable_and_pins_later_ones(
    url: str, adapters: dict[str, Path]
) -> None:
    first = upload_parts(url, "summ", "v1", adapter_parts(adapters["one"]))
    assert first.status_code == 201, first.text
    assert first.json()["stable"] is True and first.json()["id"] == "summ@v1"
    second = upload_parts(url, "summ", "v2", adapter_parts(adapters["two"]))
    assert second.status_code == 201 and second.json()["stable"] is False
    models = _models(url)
    assert {"summ", "summ@v1", "summ@v2"} <= set(models)
    assert models.index("summ") < models.index("summ@v1") < models.index("summ@v2")
    task = httpx.get(f"{url}/admin/adapters/summ", timeout=10).json()
    assert task["stable"] == "v1" and [v["version"] for v in task["versions"]] == ["v1", "v2"]
    plain, pinned_v1 = _complete(url, "summ").json(), _complete(url, "summ@v1").json()
    assert plain["model"] == "summ" and pinned_v1["model"] == "summ@v1"
    assert plain["choices"][0]["text"] == pinned_v1["choices"][0]["text"]
    assert _complete(url, "summ@v2").status_code == 200


def test_same_content_again_is_200_other_content_is_409(
    url: str, adapters: dict[str, Path], data_dir: Path
) -> None:
    assert upload_parts(url, "dup", "v1", adapter_parts(adapters["one"])).status_code == 201
    before = registry_snapshot(data_dir)
    again = upload_parts(url, "dup", "v1", adapter_parts(adapters["one"]))
    assert again.status_code == 200 and again.json()["id"] == "dup@v1"
    _error(upload_parts(url, "dup", "v1", adapter_parts(adapters["two"])), 409, "conflict",
           "different content")  # fmt: skip
    assert registry_snapshot(data_dir) == before


def test_delete_refuses_the_stable_version_and_removes_others(
    url: str, adapters: dict[str, Path], data_dir: Path
) -> None:
    assert upload_parts(url, "gone", "v1", adapter_parts(adapters["one"])).status_code == 201
    assert upload_parts(url, "gone", "v2", adapter_parts(adapters["two"])).status_code == 201
    _error(httpx.delete(f"{url}/admin/adapters/gone/v1"), 409, "conflict", "stable version")
    deleted = httpx.delete(f"{url}/admin/adapters/gone/v2")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert "gone@v2" not in _models(url) and "gone@v1" in _models(url)
    _error(_complete(url, "gone@v2"), 404, "model_not_found")
    assert ("gone", "v2") not in [row[:2] for row in registry_snapshot(data_dir)["rows"]]
    _error(httpx.delete(f"{url}/admin/adapters/gone/v2"), 404, "not_found")


def test_load_and_unload_move_an_adapter_between_tiers(url: str, adapters: dict[str, Path]) -> None:
    assert upload_parts(url, "tiers", "v1", adapter_parts(adapters["two"])).status_code == 201
    loaded = httpx.post(f"{url}/admin/adapters/tiers/v1/load", timeout=30)
    assert loaded.status_code == 200 and loaded.json()["status"] == "gpu"
    unloaded = httpx.post(f"{url}/admin/adapters/tiers/v1/unload", timeout=30)
    assert unloaded.status_code == 200 and unloaded.json()["status"] == "cpu"
    assert _complete(url, "tiers").status_code == 200  # loaded back on demand
    _error(httpx.post(f"{url}/admin/adapters/tiers/nope/load"), 404, "not_found")


def test_list_and_show(url: str) -> None:
    listed = httpx.get(f"{url}/admin/adapters", timeout=10).json()
    assert listed["object"] == "list"
    alpha = [a for a in listed["data"] if a["task"] == "alpha"]
    assert len(alpha) == 1 and alpha[0]["stable"] is True
    assert set(alpha[0]) >= {"id", "task", "version", "sha256", "rank", "alpha", "target_modules",
                             "size_bytes", "base_fingerprint", "created_at", "stable", "status"}  # fmt: skip
    one = httpx.get(f"{url}/admin/adapters/alpha/{alpha[0]['version']}", timeout=10).json()
    assert one == alpha[0]
    only = httpx.get(f"{url}/admin/adapters", params={"task": "alpha"}, timeout=10).json()["data"]
    assert only == alpha
    _error(httpx.get(f"{url}/admin/adapters/nope"), 404, "not_found")
    _error(httpx.get(f"{url}/admin/adapters/alpha/nope"), 404, "not_found")


# ---- bad uploads: refused with the reason, store unchanged ---------------------------------


@pytest.fixture
def unchanged(data_dir: Path) -> Iterator[None]:
    before = registry_snapshot(data_dir)
    yield
    after = registry_snapshot(data_dir)
    assert after == before and after["tmp"] == []


def _variant(src: Path, dest: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of adapter ``src`` with config keys overridden and/or tensors transformed."""
    shutil.copytree(src, dest)
    if config:
        data = json.loads((dest / CONFIG).read_text())
        (dest / CONFIG).write_text(json.dumps({**data, **config}))
    if tensors:
        weights = load_file(dest / WEIGHTS)
        save_file(tensors(weights), dest / WEIGHTS)
    return dest


@pytest.mark.usefixtures("unchanged")
def test_pickle_weights_are_refused(url: str, adapters: dict[str, Path]) -> None:
    config = (adapters["one"] / CONFIG).read_bytes()
    parts = [(CONFIG, CONFIG, config), ("adapter_model.bin", "adapter_model.bin", b"\x80\x04K\x01.")]
    _error(upload_parts(url, "pickled", "v1", parts), 400, "invalid_adapter", "pickle", "safetensors")


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("task", "field", "filename", "code", "needle"),
    [
        ("trav", "file", "../../adapter_model.safetensors", "invalid_adapter", "unexpected file"),
        ("trav", "../adapter_model.safetensors", "x", "invalid_adapter", "unexpected file"),
        ("..trav", WEIGHTS, WEIGHTS, "invalid_name", "not starting with '.'"),
        ("trav%2F..%2F..", WEIGHTS, WEIGHTS, None, ""),
    ],
)
def test_path_traversal_names_are_refused(
    url: str, adapters: dict[str, Path], task: str, field: str, filename: str,
    code: str | None, needle: str,
) -> None:  # fmt: skip
    config = (adapters["one"] / CONFIG).read_bytes()
    weights = (adapters["one"] / WEIGHTS).read_bytes()
    response = upload_parts(url, task, "v1", [(CONFIG, CONFIG, config), (field, filename, weights)])
    if code is None:  # an encoded slash never reaches a route
        assert response.status_code in (400, 404), response.text
    else:
        _error(response, 400, code, needle)


@pytest.mark.usefixtures("unchanged")
def test_oversized_upload_is_413_counted_as_it_streams(url: str, adapters: dict[str, Path]) -> None:
    config = (adapters["one"] / CONFIG).read_bytes()
    boundary = "b0undary"

    def body() -> Iterator[bytes]:  # chunked: no Content-Length to go by
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="{CONFIG}"\r\n\r\n'.encode()
        yield config + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="{WEIGHTS}"\r\n\r\n'.encode()
        for _ in range(16):
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    response = httpx.put(f"{url}/admin/adapters/big/v1", content=body(), headers=headers, timeout=60)
    _error(response, 413, "too_large", str(MAX_ADAPTER_BYTES))
    # A stated length over the limit is answered before a byte of the body is sent.
    host, port = httpx.URL(url).host, httpx.URL(url).port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            f"PUT /admin/adapters/big/v1 HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
            f"{headers['Content-Type']}\r\nContent-Length: {10 * MAX_ADAPTER_BYTES}\r\n\r\n".encode()
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")


@pytest.mark.usefixtures("unchanged")
def test_wrong_shapes_are_refused(url: str, adapters: dict[str, Path], tmp_path: Path) -> None:
    def cut_rank(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = next(k for k in weights if "lora_B" in k)
        return {**weights, key: weights[key][:, :2].contiguous()}  # B [out, 2] against A [4, in]

    bad = _variant(adapters["one"], tmp_path / "shapes", tensors=cut_rank)
    response = upload_parts(url, "shapes", "v1", adapter_parts(bad))
    assert response.status_code == 400
    assert "shapes" in response.json()["error"]["message"]


@pytest.mark.usefixtures("unchanged")
def test_nan_weights_are_refused(url: str, adapters: dict[str, Path], tmp_path: Path) -> None:
    def poison(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = next(iter(weights))
        tensor = weights[key].clone()
        tensor[0, 0] = float("nan")
        return {**weights, key: tensor}

    bad = _variant(adapters["one"], tmp_path / "nan", tensors=poison)
    _error(upload_parts(url, "nan", "v1", adapter_parts(bad)), 400, "invalid_adapter", "NaN")


@pytest.mark.usefixtures("unchanged")
def test_dora_is_refused(url: str, adapters: dict[str, Path], tmp_path: Path) -> None:
    bad = _variant(adapters["one"], tmp_path / "dora", config={"use_dora": True})
    _error(upload_parts(url, "dora", "v1", adapter_parts(bad)), 400, "invalid_adapter", "DoRA")


@pytest.mark.usefixtures("unchanged")
def test_adapter_for_another_base_model_is_refused(url: str, tmp_path: Path) -> None:
    other_model = make_tiny_model(tmp_path, "llama", hidden_size=32, intermediate_size=64)
    other = make_peft_adapter(other_model, tmp_path / "other")
    _error(upload_parts(url, "other", "v1", adapter_parts(other)), 400, "wrong_base_model",
           "another base model")  # fmt: skip


@pytest.mark.usefixtures("unchanged")
def test_declared_base_fingerprint_must_match(url: str, adapters: dict[str, Path]) -> None:
    parts = [("base_fingerprint", None, b"0" * 64), *adapter_parts(adapters["one"])]
    _error(upload_parts(url, "declared", "v1", parts), 400, "wrong_base_model", "fingerprint")


@pytest.mark.usefixtures("unchanged")
def test_malformed_uploads_are_refused(url: str, adapters: dict[str, Path]) -> None:
    raw = httpx.put(f"{url}/admin/adapters/raw/v1", content=b"x" * 10,
                    headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    _error(raw, 400, "invalid_multipart", "multipart/form-data")
    config_last = list(reversed(adapter_parts(adapters["one"])))
    _error(upload_parts(url, "order", "v1", config_last), 400, "invalid_adapter",
           f"send {CONFIG} before")  # fmt: skip
    _error(upload_parts(url, "base", "v1", adapter_parts(adapters["one"])), 409, "conflict",
           "base model")  # fmt: skip
    _error(upload_parts(url, "empty", "v1", []), 400, "invalid_multipart")
