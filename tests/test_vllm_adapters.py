"""vLLM's runtime adapter API over real HTTP: POST /v1/load_lora_adapter and
/v1/unload_lora_adapter register into (and remove from) the same registry as uploads, answer
as vLLM does, and refuse what they cannot do with the reason; the store is unchanged after a
refusal."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_utils import registry_snapshot, running_server
from tests.tiny_models import make_peft_adapter, make_tiny_model

TOKEN = "vllm-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), "llama")


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "one": make_peft_adapter(model_dir, root / "one", r=4, seed=11, std=0.3),
        "two": make_peft_adapter(model_dir, root / "two", r=8, seed=12, std=0.3),
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def url(model_dir: Path, data_dir: Path) -> Iterator[str]:
    with running_server(
        model_dir, {}, served_model_name="base", data_dir=str(data_dir), admin_token=TOKEN
    ) as base_url:
        yield base_url


def load(url: str, name: str, path: Path | str, **extra: object) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(path), **extra}
    return httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=ADMIN, timeout=60)


def unload(url: str, name: str, **extra: object) -> httpx.Response:
    body = {"lora_name": name, **extra}
    return httpx.post(f"{url}/v1/unload_lora_adapter", json=body, headers=ADMIN, timeout=60)


def models(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]


def complete(url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "abc", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def error(response: httpx.Response, status: int, code: str | None, *needles: str) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    for needle in needles:
        assert needle in err["message"], err["message"]
    return err


def test_load_serves_the_name_and_again_changes_nothing(
    url: str, adapters: dict[str, Path], data_dir: Path
) -> None:
    response = load(url, "sql", adapters["one"])
    assert response.status_code == 200, response.text
    assert response.text == "Success: LoRA adapter 'sql' added successfully."
    assert response.headers["content-type"].startswith("text/plain")
    [version] = [m.split("@")[1] for m in models(url) if m.startswith("sql@")]
    assert "sql" in models(url)
    plain, pinned = complete(url, "sql"), complete(url, f"sql@{version}")
    assert plain.status_code == 200 and plain.headers["x-peftserve-version"] == f"sql@{version}"
    assert plain.json()["choices"][0]["text"] == pinned.json()["choices"][0]["text"]
    admin_view = httpx.get(f"{url}/admin/adapters/sql", headers=ADMIN, timeout=10).json()
    assert admin_view["stable"] == version  # the same registry as uploads
    before = registry_snapshot(data_dir)
    assert load(url, "sql", adapters["one"]).status_code == 200
    assert registry_snapshot(data_dir) == before


def test_refusals_name_the_reason_and_change_nothing(
    url: str, adapters: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    assert load(url, "keep", adapters["one"]).status_code == 200
    before = registry_snapshot(data_dir)
    error(load(url, "keep", adapters["two"]), 409, "conflict", "unload it first")
    error(load(url, "fresh", tmp_path / "nowhere"), 400, None, "does not exist")
    (tmp_path / "empty").mkdir()
    error(load(url, "fresh", tmp_path / "empty"), 400, None, "adapter_config.json")
    error(load(url, "base", adapters["two"]), 409, "conflict", "base model")
    err = error(load(url, "keep", adapters["two"], load_inplace=True), 400, "unsupported_parameter")
    assert err["param"] == "load_inplace"
    assert (
        error(load(url, "x", adapters["two"], lora_dtype="f16"), 400, None)["param"] == "lora_dtype"
    )
    error(load(url, "bad name!", adapters["two"]), 400, None, "task name")
    missing = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x"}, headers=ADMIN)
    assert error(missing, 400, None)["param"] == "lora_path"
    error(unload(url, "never-loaded"), 404, None, "never-loaded")
    assert registry_snapshot(data_dir) == before


def test_unload_removes_the_task_and_a_new_load_serves_new_content(
    url: str, adapters: dict[str, Path], data_dir: Path
) -> None:
    assert load(url, "swap", adapters["one"]).status_code == 200
    assert complete(url, "swap").status_code == 200
    response = unload(url, "swap", lora_int_id=7)
    assert response.status_code == 200, response.text
    assert response.text == "Success: LoRA adapter 'swap' removed successfully."
    assert not [m for m in models(url) if m.split("@")[0] == "swap"]
    error(complete(url, "swap"), 404, "model_not_found")
    assert "swap" not in {row[0] for row in registry_snapshot(data_dir)["rows"]}
    assert "swap" not in {row[0] for row in registry_snapshot(data_dir)["stable"]}
    error(unload(url, "swap"), 404, None)
    # vLLM's reload: unload, then load new weights under the same name
    assert load(url, "swap", adapters["two"]).status_code == 200
    second = complete(url, "swap")
    assert second.status_code == 200
    sha = {row[0]: row[2] for row in registry_snapshot(data_dir)["rows"]}["swap"]
    assert second.headers["x-peftserve-version"] == f"swap@{sha[:12]}"


def test_versions_load_pinned_and_unload_alone(url: str, adapters: dict[str, Path]) -> None:
    assert load(url, "multi", adapters["one"]).status_code == 200
    assert load(url, "multi@v9", adapters["two"]).status_code == 200
    assert "multi@v9" in models(url)
    assert complete(url, "multi").headers["x-peftserve-version"] != "multi@v9"  # v9 only pinned
    stable = complete(url, "multi").headers["x-peftserve-version"]
    error(unload(url, stable), 409, "conflict", "stable version")
    assert unload(url, "multi@v9").status_code == 200
    assert "multi@v9" not in models(url) and "multi" in models(url)


def test_unload_refuses_a_task_in_an_active_rollout(
    url: str, adapters: dict[str, Path], data_dir: Path
) -> None:
    assert load(url, "roll", adapters["one"]).status_code == 200
    assert load(url, "roll@v2", adapters["two"]).status_code == 200
    body = {"task": "roll", "candidate": "v2", "step_interval_s": 3600}
    started = httpx.post(f"{url}/admin/rollouts", json=body, headers=ADMIN, timeout=60)
    assert started.status_code == 201, started.text
    before = registry_snapshot(data_dir)
    error(unload(url, "roll"), 409, "conflict", "active rollout")
    assert registry_snapshot(data_dir) == before and "roll" in models(url)
    httpx.post(f"{url}/admin/rollouts/roll/rollback", headers=ADMIN, timeout=30)
    assert unload(url, "roll").status_code == 200
    assert "roll" not in models(url)
