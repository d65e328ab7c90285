"""`peftserve serve` flags: generated from the config dataclasses, env vars, errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from peftserve.cli import add_config_flags, build_parser, serve_settings
from peftserve.config import DEFAULT_MODEL_DIR, ServerConfig
from peftserve.server import startup
from peftserve.server.settings import (
    ALIASES,
    CONFIG_CLASSES,
    ServeSettings,
    config_values,
    field_docs,
    flag_specs,
)
from tests.server_utils import wait_for
from tests.tiny_models import make_peft_adapter, make_tiny_model


def _settings(argv: list[str], env: dict[str, str] | None = None) -> ServeSettings:
    args = build_parser().parse_args(["serve", *argv])
    return serve_settings(args, env or {})


def _run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peftserve.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_every_config_field_is_a_flag_with_its_docstring_and_env_var() -> None:
    proc = _run_cli("serve", "--help")
    help_text = " ".join(proc.stdout.split())
    for cls in CONFIG_CLASSES:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            assert flag in help_text, flag
            assert f"PEFTSERVE_{f.name.upper()}" in help_text
            assert docs[f.name], f"{cls.__name__}.{f.name} has no docstring"
            assert docs[f.name] in help_text


def test_field_docs_reads_the_string_under_each_field() -> None:
    docs = field_docs(ServerConfig)
    assert docs["host"] == "Address to listen on."
    assert set(docs) == {f.name for f in dataclasses.fields(ServerConfig)}


def test_flags_reach_every_config() -> None:
    argv = (
        "--model /m --device cpu --dtype float32 --seed 7 --max-lora-rank 8 --max-loras 3 "
        "--lora-backend torch --block-size 32 --kv-cache-memory-gb 0.5 --max-model-len 99 "
        "--max-num-seqs 4 --max-num-batched-tokens 64 --max-waiting 2 --host 0.0.0.0 --port 9 "
        "--adapter a=/x --adapter b=/y --served-model-name base --api-key k1 --api-key k2 "
        "--admin-token t --data-dir /d --log-level debug"
    )
    s = _settings(argv.split(" "))
    e, srv = s.engine, s.server
    assert (e.model.model, e.model.device, e.model.dtype, e.model.seed) == (
        "/m",
        "cpu",
        "float32",
        7,
    )
    assert (e.lora.max_lora_rank, e.lora.max_loras, e.lora.lora_backend) == (8, 3, "torch")
    assert (e.cache.block_size, e.cache.kv_cache_memory_gb, e.cache.max_model_len) == (32, 0.5, 99)
    assert (
        e.scheduler.max_num_seqs,
        e.scheduler.max_num_batched_tokens,
        e.scheduler.max_waiting,
    ) == (4, 64, 2)
    assert (srv.host, srv.port, srv.adapter) == ("0.0.0.0", 9, ["a=/x", "b=/y"])
    assert (srv.served_model_name, srv.api_key, srv.admin_token) == ("base", ["k1", "k2"], "t")
    assert (srv.data_dir, srv.log_level) == ("/d", "debug")


def test_vllm_flag_names_set_our_fields() -> None:
    argv = [
        "--enable-lora", "--max-loras", "3", "--max-lora-rank", "8", "--max-cpu-loras", "5",
        "--lora-modules", "a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}',
        "--adapter", "c=/z", "--lora-modules", "d=/w",
    ]  # fmt: skip
    s = _settings(argv)
    assert s.server.adapter == ["a=/x", "b=/y", "c=/z", "d=/w"]  # both spellings, in order
    assert (s.engine.lora.max_loras, s.engine.lora.max_lora_rank) == (3, 8)
    assert s.engine.lora.max_cpu_adapters == 5
    assert s.explicit == {"adapter", "max_loras", "max_lora_rank", "max_cpu_adapters"}
    fields = {spec.field for spec in flag_specs()}
    assert all(alias.field in fields for alias in ALIASES)
    # env vars exist for our names only
    assert _settings([], {"PEFTSERVE_MAX_CPU_LORAS": "9"}).engine.lora.max_cpu_adapters == 64


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nopath", "expected name=path"),
        ('{"name": "a"}', '"path": PATH'),
        ('{"name": "a", "path": "/x", "dtype": "f"}', "unsupported key(s) dtype"),
        ("{oops", "not valid JSON"),
    ],
)
def test_bad_lora_modules_value_names_the_problem(value: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora-modules", value])
    assert message in capsys.readouterr().err


def test_defaults_when_nothing_is_given() -> None:
    s = _settings([])
    assert s.engine.model.model == str(DEFAULT_MODEL_DIR)
    assert (s.server.host, s.server.port, s.engine.lora.max_lora_rank) == ("127.0.0.1", 8000, 64)
    assert s.explicit == frozenset()


def test_flag_beats_env_beats_default() -> None:
    env = {"PEFTSERVE_PORT": "9001", "PEFTSERVE_MAX_LORA_RANK": "16", "PEFTSERVE_DTYPE": "bfloat16"}
    s = _settings(["--port", "9002"], env)
    assert s.server.port == 9002  # flag beats env
    assert s.engine.lora.max_lora_rank == 16  # env beats default
    assert s.engine.model.dtype == "bfloat16"
    assert s.engine.cache.block_size == 16  # default
    assert s.explicit == {"port", "max_lora_rank", "dtype"}


def test_list_env_vars_are_comma_separated() -> None:
    env = {"PEFTSERVE_ADAPTER": "a=/x, b=/y", "PEFTSERVE_API_KEY": "k1,k2"}
    s = _settings([], env)
    assert s.server.adapter == ["a=/x", "b=/y"]
    assert s.server.api_key == ["k1", "k2"]
    assert _settings(["--api-key", "k3"], env).server.api_key == ["k3"]


def test_config_validation_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="max_lora_rank"):
        _settings(["--max-lora-rank", "0"])
    with pytest.raises(ValueError, match="PEFTSERVE_PORT"):
        _settings([], {"PEFTSERVE_PORT": "http"})


def test_duplicate_field_names_across_configs_are_refused() -> None:
    @dataclass
    class A:
        port: int = 1
        """A port."""

    with pytest.raises(ValueError, match="port"):
        flag_specs([A, *CONFIG_CLASSES])


@dataclass
class _Toggles:
    fast: bool = False
    """Go fast."""
    names: list[str] = field(default_factory=list)
    """Names."""
    ratio: float | None = None
    """A ratio."""


def test_bool_list_and_optional_fields() -> None:
    specs = flag_specs([_Toggles])
    parser = argparse.ArgumentParser()
    add_config_flags(parser, specs)
    args = parser.parse_args(["--fast", "--names", "a", "--names", "b", "--ratio", "0.5"])
    assert config_values(args, specs, {}) == {"fast": True, "names": ["a", "b"], "ratio": 0.5}
    assert config_values(parser.parse_args(["--no-fast"]), specs, {"PEFTSERVE_FAST": "1"}) == {
        "fast": False
    }
    assert config_values(parser.parse_args([]), specs, {"PEFTSERVE_FAST": "yes"}) == {"fast": True}
    with pytest.raises(ValueError, match="PEFTSERVE_FAST"):
        config_values(parser.parse_args([]), specs, {"PEFTSERVE_FAST": "maybe"})


def test_demo_adapters_with_default_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("reverse", "sort", "reverse-v2", "reverse-v2-regressed", "sort-vx"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / "base").mkdir()  # no adapter_config.json: not an adapter
    monkeypatch.setattr(startup, "DEFAULT_ADAPTERS_DIR", tmp_path)
    assert startup.served_adapters(_settings([])) == {
        "reverse": str(tmp_path / "reverse"),
        "sort": str(tmp_path / "sort"),
        "sort-vx": str(tmp_path / "sort-vx"),  # not TASK-v<digit>: a task of its own
    }
    assert startup.candidate_of("reverse-v2-regressed", ["reverse"]) == ("reverse", "v2-regressed")
    assert startup.served_adapters(_settings(["--adapter", "x=/p"])) == {"x": "/p"}
    assert startup.served_adapters(_settings(["--model", str(tmp_path)])) == {}


def test_duplicate_adapter_names_are_refused() -> None:
    with pytest.raises(startup.StartupError, match="twice"):
        startup.served_adapters(_settings(["--adapter", "a=/x", "--adapter", "a=/y"]))


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_cli_missing_model_dir_is_one_line_error() -> None:
    proc = _run_cli("serve", "--model", "/nonexistent")
    _assert_one_line_error(proc, "/nonexistent", "does not exist")


def test_cli_dir_without_config_is_one_line_error(tmp_path: Path) -> None:
    proc = _run_cli("serve", "--model", str(tmp_path))
    _assert_one_line_error(proc, "config.json")


def test_cli_unsupported_model_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "not-a-model"}')
    proc = _run_cli("serve", "--model", str(tmp_path), "--log-level", "error")
    _assert_one_line_error(proc, "cannot load model")


def test_cli_invalid_config_exits_2() -> None:
    proc = _run_cli("serve", "--dtype", "float8")
    assert proc.returncode == 2
    _assert_one_line_error(proc, "dtype must be")


def test_cli_invalid_env_exits_2() -> None:
    proc = _run_cli("serve", env={**os.environ, "PEFTSERVE_MAX_NUM_SEQS": "many"})
    assert proc.returncode == 2
    _assert_one_line_error(proc, "PEFTSERVE_MAX_NUM_SEQS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_and_stops_on_sigint(tmp_path: Path) -> None:
    """The real entry point, configured through env vars only; Ctrl-C exits cleanly."""
    model_dir = make_tiny_model(tmp_path, "mistral")
    adapter_dir = make_peft_adapter(model_dir, tmp_path / "adapter")
    port = _free_port()
    env = {
        **os.environ,
        "PEFTSERVE_MODEL": str(model_dir),
        "PEFTSERVE_ADAPTER": f"demo={adapter_dir}",
        "PEFTSERVE_PORT": str(port),
        "PEFTSERVE_SERVED_MODEL_NAME": "tiny",
        "PEFTSERVE_LOG_LEVEL": "warning",
        "PEFTSERVE_DATA_DIR": str(tmp_path / "data"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftserve.cli", "serve"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _healthy(url, proc), timeout=120), "server did not come up"
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
        assert ids[:2] == ["tiny", "demo"] and len(ids) == 3 and ids[2].startswith("demo@")
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


def _healthy(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"server exited with {proc.returncode}")
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
