"""SIGKILL in the middle of an upload: after a restart the registry holds exactly the adapters
committed before, and no temporary file remains."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_utils import (
    adapter_parts,
    registry_snapshot,
    running_server,
    upload_parts,
    wait_for,
)
from tests.tiny_models import make_peft_adapter, make_tiny_model

BOUNDARY = "crash-boundary"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model_dir: Path, data_dir: Path, port: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "peftserve.cli", "serve", "--model", str(model_dir),
            "--device", "cpu", "--port", str(port), "--data-dir", str(data_dir),
            "--served-model-name", "base", "--log-level", "warning"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _healthy(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()}")
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _slow_body(adapter_dir: Path, stop: threading.Event) -> Iterator[bytes]:
    """A multipart upload that sends its config and part of its weights, then stalls."""
    config = (adapter_dir / "adapter_config.json").read_bytes()
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="adapter_config.json"\r\n\r\n'
           .encode() + config)  # fmt: skip
    yield (f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="adapter_model.safetensors"'
           "\r\n\r\n").encode() + weights[: len(weights) // 2]  # fmt: skip
    while not stop.wait(0.05):
        yield weights[len(weights) // 2 : len(weights) // 2 + 1]  # a trickle, never the end


def _staged_upload(data_dir: Path) -> bool:
    """Whether the registry is staging an upload with part of its weights written."""
    return any(f.stat().st_size > 0 for f in (data_dir / "tmp").glob("upload-*/adapter_model.safetensors"))


@pytest.mark.timeout(240)
def test_sigkill_mid_upload_leaves_exactly_the_committed_adapters(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, "llama")
    kept = make_peft_adapter(model_dir, tmp_path / "kept", std=0.3)
    interrupted = make_peft_adapter(model_dir, tmp_path / "interrupted", r=16, seed=5, std=0.3)
    data_dir = tmp_path / "data"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(model_dir, data_dir, port)
    stop = threading.Event()
    try:
        assert wait_for(lambda: _healthy(url, proc), timeout=120), "server did not come up"
        assert upload_parts(url, "kept", "v1", adapter_parts(kept)).status_code == 201
        committed = registry_snapshot(data_dir)

        def upload() -> None:
            headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
            with contextlib.suppress(httpx.HTTPError):  # the server dies under it
                httpx.put(f"{url}/admin/adapters/lost/v1", content=_slow_body(interrupted, stop),
                          headers=headers, timeout=60)  # fmt: skip

        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        assert wait_for(lambda: _staged_upload(data_dir), timeout=30), "upload never started staging"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert list((data_dir / "tmp").iterdir()), "the kill should leave a staging directory behind"

    with running_server(model_dir, data_dir=str(data_dir), served_model_name="base") as restarted:
        listed = httpx.get(f"{restarted}/admin/adapters", timeout=10).json()["data"]
        assert [a["id"] for a in listed] == ["kept@v1"]
        after = registry_snapshot(data_dir)
        assert after == {**committed, "tmp": []}
        assert after["tmp"] == [] and after["blobs"] == [listed[0]["sha256"]]
        models = [m["id"] for m in httpx.get(f"{restarted}/v1/models", timeout=10).json()["data"]]
        assert models == ["base", "kept", "kept@v1"]
        body = {"model": "kept", "prompt": "abc", "max_tokens": 3}
        assert httpx.post(f"{restarted}/v1/completions", json=body, timeout=60).status_code == 200
    uploader.join(timeout=10)
