"""`peftserve adapters ...` against a running server: upload with no restart, tables, --json,
and failures that exit non-zero with the server's message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from peftserve.cli import main
from tests.server_utils import running_server
from tests.tiny_models import make_peft_adapter, make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), "llama")


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(model_dir, tmp_path_factory.mktemp("adapters") / "alpha", r=8, std=0.3)


@pytest.fixture(scope="module")
def url(model_dir: Path, adapter_dir: Path) -> Iterator[str]:
    with running_server(model_dir, {"alpha": adapter_dir}, served_model_name="base") as base_url:
        yield base_url


def _cli(url: str, *argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["adapters", *argv, "--server", url])
    out, err = capsys.readouterr()
    return code, out, err


def test_upload_through_the_cli_is_served_without_restart(
    url: str, model_dir: Path, tmp_path: Path
) -> None:
    """A fresh peft adapter, uploaded by the real command line, shows up in the openai client's
    model list and completes."""
    fresh = make_peft_adapter(model_dir, tmp_path / "fresh", r=4, seed=11, std=0.3,
                              target_modules=["q_proj", "k_proj", "v_proj"])  # fmt: skip
    env = {**os.environ, "PEFTSERVE_SERVER": url}
    proc = subprocess.run(
        [sys.executable, "-m", "peftserve.cli", "adapters", "upload", str(fresh),
         "--name", "fresh", "--version", "v1"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "uploaded fresh@v1" in proc.stdout and "the stable version" in proc.stdout
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    ids = [m.id for m in client.models.list().data]
    assert {"fresh", "fresh@v1"} <= set(ids)
    out = client.completions.create(
        model="fresh", prompt="hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.model == "fresh" and out.usage.completion_tokens == 8
    base = client.completions.create(
        model="base", prompt="hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text != base.choices[0].text


def test_list_table_and_json(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(url, "list", capsys=capsys)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["TASK", "VERSION", "STABLE", "STATUS", "RANK", "SIZE", "SHA256", "CREATED"]
    alpha = next(row.split() for row in rows if row.startswith("alpha "))
    assert alpha[2] == "yes" and alpha[4] == "8"
    code, out, _ = _cli(url, "list", "--json", capsys=capsys)
    data = json.loads(out)
    assert code == 0 and any(a["task"] == "alpha" and a["stable"] for a in data)


def test_show_task_and_version(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(url, "show", "alpha", capsys=capsys)
    assert code == 0 and out.startswith("task alpha: stable version ")
    version = out.split()[4].rstrip(",")
    code, out, _ = _cli(url, "show", f"alpha@{version}", capsys=capsys)
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert code == 0 and lines["ref"] == f"alpha@{version}" and lines["stable"] == "True"
    code, out, _ = _cli(url, "show", f"alpha@{version}", "--json", capsys=capsys)
    assert json.loads(out)["version"] == version
    code, out, _ = _cli(url, "show", "alpha", "--json", capsys=capsys)
    assert json.loads(out)["stable"] == version


def test_delete_load_unload(url: str, adapter_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(url, "upload", str(adapter_dir), "--name", "alpha", "--version", "v2",
                capsys=capsys)[0] == 0  # fmt: skip
    code, out, _ = _cli(url, "load", "alpha@v2", capsys=capsys)
    assert code == 0 and out.strip() == "loaded alpha@v2 (now gpu)"
    code, out, _ = _cli(url, "unload", "alpha@v2", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["status"] == "cpu"
    code, out, _ = _cli(url, "delete", "alpha@v2", capsys=capsys)
    assert code == 0 and out.strip() == "deleted alpha@v2"


def test_failures_exit_nonzero_with_the_server_message(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _cli(url, "show", "nope@v1", capsys=capsys)
    assert code == 1 and out == ""
    assert err.strip() == "peftserve adapters show: error: adapter nope@v1 is not registered (HTTP 404)"
    code, _, err = _cli(url, "delete", "alpha@" + _stable(url, capsys), capsys=capsys)
    assert code == 1 and "stable version" in err and "(HTTP 409)" in err
    code, _, err = _cli(url, "delete", "alpha", capsys=capsys)
    assert code == 1 and "expected TASK@VERSION, not 'alpha'" in err
    code, _, err = _cli(url, "upload", str(tmp_path), "--name", "x", "--version", "v1", capsys=capsys)
    assert code == 1 and f"{tmp_path} has no adapter_config.json, so it is not a PEFT adapter directory" in err
    code, _, err = _cli("http://127.0.0.1:9", "list", capsys=capsys)
    assert code == 1 and "cannot reach" in err


def _stable(url: str, capsys: pytest.CaptureFixture[str]) -> str:
    _, out, _ = _cli(url, "show", "alpha", "--json", capsys=capsys)
    return json.loads(out)["stable"]


def test_what_a_wrong_directory_is_told(
    url: str, adapter_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file, a folder of adapters, a folder with pickle weights: each told what to give instead."""
    config = adapter_dir / "adapter_config.json"
    code, _, err = _cli(url, "upload", str(config), "--name", "x", "--version", "v1", capsys=capsys)
    assert code == 1 and f"{config} is a file, not an adapter directory" in err
    assert f"give its directory {adapter_dir}" in err
    code, _, err = _cli(url, "upload", str(adapter_dir.parent), "--name", "x", "--version", "v1", capsys=capsys)
    assert code == 1 and f"it holds adapter directories: {adapter_dir.name}" in err
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    code, _, err = _cli(url, "upload", str(tmp_path), "--name", "x", "--version", "v1", capsys=capsys)
    assert code == 1 and "has no adapter_model.safetensors (it has adapter_model.bin" in err
    code, _, err = _cli(url, "upload", str(tmp_path / "nope"), "--name", "x", "--version", "v1", capsys=capsys)
    assert code == 1 and f"adapter directory {tmp_path / 'nope'} does not exist" in err


def test_server_without_scheme_and_demo_help(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(url.removeprefix("http://"), "list", capsys=capsys)
    assert code == 0 and out.startswith("TASK"), err
    with pytest.raises(SystemExit) as done:
        main(["demo", "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: peftserve demo")
