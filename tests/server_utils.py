"""A real peftserve server on a loopback port, for tests that speak HTTP to it.

``running_server(model_dir, adapters, **flags)`` builds the settings through the same CLI
code path as ``peftserve serve`` (flags named like config fields: ``max_num_seqs=2``,
``api_key=["k1", "k2"]``), runs uvicorn in a background thread on a free port, waits for
``/health`` and yields the base URL. The server runs in-process, so a test can monkeypatch
the API's internals while it runs. Without a ``data_dir`` flag each server gets a fresh
temporary data directory (its adapter registry), removed when it stops.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from peftserve.cli import build_parser, serve_settings
from peftserve.server.local import build_serving_app

STARTUP_TIMEOUT_S = 120.0


def serve_argv(
    model_dir: Path | str, adapters: Mapping[str, Path | str], flags: Mapping[str, Any]
) -> list[str]:
    argv = ["serve", "--model", str(model_dir), "--device", "cpu"]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    for key, value in flags.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            argv += ["--" + key.replace("_", "-"), str(item)]
    return argv


@contextlib.contextmanager
def running_server(
    model_dir: Path | str, adapters: Mapping[str, Path | str] | None = None, **flags: Any
) -> Iterator[str]:
    """Serve ``model_dir`` (+ adapters) on 127.0.0.1:<free port>; yields ``http://127.0.0.1:<port>``."""
    if "data_dir" in flags:
        with _serve(model_dir, adapters, flags) as url:
            yield url
        return
    with (
        tempfile.TemporaryDirectory(prefix="peftserve-data-") as data_dir,
        _serve(model_dir, adapters, {**flags, "data_dir": data_dir}) as url,
    ):
        yield url


@contextlib.contextmanager
def _serve(
    model_dir: Path | str, adapters: Mapping[str, Path | str] | None, flags: dict[str, Any]
) -> Iterator[str]:
    flags.setdefault("log_level", "warning")
    args = build_parser().parse_args(serve_argv(model_dir, adapters or {}, flags))
    settings = serve_settings(args, environ={})
    app = build_serving_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level=settings.server.log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_healthy(url, thread)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _wait_healthy(url: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("server thread exited during startup (see the log above)")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"server at {url} not healthy after {STARTUP_TIMEOUT_S}s")


def engine_stats(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/health", timeout=10)
    response.raise_for_status()
    return response.json()["engine"]


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until it is truthy or ``timeout`` passes; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return bool(result)
        time.sleep(interval)


def registry_snapshot(data_dir: Path | str) -> dict[str, Any]:
    """What the registry under ``data_dir`` holds: rows, stable pointers, blobs, tmp/ entries."""
    import sqlite3

    root = Path(data_dir)
    conn = sqlite3.connect(root / "peftserve.db")
    try:
        rows = conn.execute("SELECT task, version, sha256 FROM adapters ORDER BY id").fetchall()
        stable = conn.execute("SELECT task, version FROM task_stable ORDER BY task").fetchall()
    finally:
        conn.close()
    return {
        "rows": rows,
        "stable": stable,
        "blobs": sorted(p.name for p in (root / "blobs").iterdir()),
        "tmp": sorted(p.name for p in (root / "tmp").iterdir()),
    }


def upload_parts(
    url: str,
    task: str,
    version: str,
    parts: list[tuple[str, str | None, bytes]],
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    """PUT /admin/adapters/task/version with multipart parts (field name, filename, data), in order."""
    files = [(name, (filename, data, "application/octet-stream")) for name, filename, data in parts
             if filename is not None]  # fmt: skip
    fields = {name: data.decode() for name, filename, data in parts if filename is None}
    return httpx.put(
        f"{url}/admin/adapters/{task}/{version}", files=files, data=fields, headers=headers, timeout=60
    )


def adapter_parts(adapter_dir: Path | str) -> list[tuple[str, str | None, bytes]]:
    """The two files of an adapter directory as upload parts (config first)."""
    root = Path(adapter_dir)
    names = ("adapter_config.json", "adapter_model.safetensors")
    return [(name, name, (root / name).read_bytes()) for name in names]
