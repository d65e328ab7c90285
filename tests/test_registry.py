"""Adapter registry: content addressing, validation, refusals, atomicity and crash safety."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config

from peftserve.lora.peft_adapter import load_adapter
from peftserve.registry import (
    Conflict,
    InvalidAdapter,
    InvalidName,
    NotFound,
    Registry,
    StorageFull,
    StorageUnavailable,
    TooLarge,
    WrongBaseModel,
    base_fingerprint,
    connect,
)
from peftserve.registry.db import SCHEMA_VERSION
from tests.tiny_models import make_peft_adapter, make_tiny_model

REPO = Path(__file__).resolve().parent.parent
FILES = ("adapter_config.json", "adapter_model.safetensors")
BAD_NAMES = ["../x", "a/b", "Upper", "a" * 65, ".hidden", "-x", "", "a b", "x\n", "a\\b", "é"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m"), "llama")


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def validate(model):
    return partial(load_adapter, model=model, max_rank=64)


@pytest.fixture(scope="module")
def fingerprint(model) -> str:
    return base_fingerprint(model.config)


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    """Good adapters a, b, c (different content) and broken variants of a."""
    root = tmp_path_factory.mktemp("adapters")
    out = {
        "a": make_peft_adapter(model_dir, root / "a", seed=1),
        "b": make_peft_adapter(model_dir, root / "b", seed=2, r=8, target_modules="all-linear", lora_alpha=16),
        "c": make_peft_adapter(model_dir, root / "c", seed=3),
    }
    out["nan"] = _variant(out["a"], root / "nan")
    weights = load_file(out["nan"] / FILES[1])
    next(iter(weights.values()))[0, 0] = float("nan")
    save_file(weights, out["nan"] / FILES[1])
    out["dora"] = _variant(out["a"], root / "dora")
    config = json.loads((out["dora"] / FILES[0]).read_text())
    (out["dora"] / FILES[0]).write_text(json.dumps({**config, "use_dora": True}))
    other_base = make_tiny_model(root, "llama", hidden_size=32, intermediate_size=64)
    out["other_base"] = make_peft_adapter(other_base, root / "other_base")
    out["pickle"] = root / "pickle"
    out["pickle"].mkdir()
    shutil.copy(out["a"] / FILES[0], out["pickle"])
    torch.save(load_file(out["a"] / FILES[1]), out["pickle"] / "adapter_model.bin")
    out["both"] = _variant(out["a"], root / "both")
    shutil.copy(out["pickle"] / "adapter_model.bin", out["both"])
    return out


@pytest.fixture
def registry(tmp_path, fingerprint):
    with Registry(tmp_path / "data", fingerprint) as reg:
        yield reg


def _variant(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _assert_empty_store(reg: Registry) -> None:
    assert reg.list() == []
    assert _files(reg.data_dir / "blobs") == []
    assert _files(reg.data_dir / "tmp") == []


def _sha256sum_of_sha256sum(adapter: Path) -> str:
    """The documented definition: ``sha256sum <files in name order> | sha256sum``."""
    lines = "".join(f"{hashlib.sha256((adapter / n).read_bytes()).hexdigest()}  {n}\n" for n in FILES)
    return hashlib.sha256(lines.encode()).hexdigest()


def test_add_list_get_latest_delete(registry, adapters, validate, fingerprint):
    a1 = registry.add_from_dir("reverse", "v1", adapters["a"], validate).record
    assert (a1.task, a1.version, a1.rank, a1.alpha) == ("reverse", "v1", 4, 8.0)
    assert a1.target_modules == ("q_proj", "v_proj")
    assert a1.sha256 == _sha256sum_of_sha256sum(adapters["a"])
    assert a1.size_bytes == sum((adapters["a"] / n).stat().st_size for n in FILES)
    assert a1.base_fingerprint == fingerprint and a1.created_at <= time.time()
    stored = registry.path_of(a1)
    assert stored == registry.data_dir / "blobs" / a1.sha256
    assert sorted(p.name for p in stored.iterdir()) == list(FILES)  # README.md was not copied
    for name in FILES:
        assert (stored / name).read_bytes() == (adapters["a"] / name).read_bytes()
    b2 = registry.add_from_dir("reverse", "v2", adapters["b"], validate).record
    assert (b2.rank, b2.alpha, len(b2.target_modules)) == (8, 16.0, 7)
    registry.add_from_dir("sort", "1.0.0", adapters["a"], validate)  # same content, other task
    assert [r.ref for r in registry.list()] == ["reverse@v1", "reverse@v2", "sort@1.0.0"]
    assert [r.ref for r in registry.list("reverse")] == ["reverse@v1", "reverse@v2"]
    assert registry.tasks() == ["reverse", "sort"]
    assert registry.get("reverse", "v1") == a1
    assert registry.latest("reverse") == b2
    assert a1.to_dict()["target_modules"] == ["q_proj", "v_proj"]

    def never(task: str, version: str) -> bool:
        return False

    assert registry.delete("reverse", "v1", never) == a1
    assert stored.is_dir()  # sort@1.0.0 still uses the same files
    registry.delete("sort", "1.0.0", never)
    assert not stored.exists()
    with pytest.raises(NotFound):
        registry.get("reverse", "v1")
    with pytest.raises(NotFound):
        registry.path_of(a1)
    with pytest.raises(NotFound):
        registry.latest("sort")
    with pytest.raises(NotFound):
        registry.delete("sort", "1.0.0", never)
    assert registry.list() == [b2]
    assert _files(registry.data_dir / "tmp") == []
    assert load_adapter(registry.path_of(b2), validate.keywords["model"], 64).rank == 8


def test_same_content_is_idempotent_different_content_conflicts(registry, adapters, validate):
    first, created = registry.add_from_dir("t", "v1", adapters["a"], validate)
    assert created
    assert registry.add_from_dir("t", "v1", adapters["a"], validate) == (first, False)
    streamed = {name: (adapters["a"] / name).read_bytes() for name in FILES}
    assert registry.add_from_stream("t", "v1", streamed, 1 << 20, validate) == (first, False)
    with pytest.raises(Conflict, match="different content") as err:
        registry.add_from_dir("t", "v1", adapters["b"], validate)
    assert err.value.status == 409
    assert registry.list() == [first]
    assert _files(registry.data_dir / "blobs") == [first.sha256, *(f"{first.sha256}/{n}" for n in FILES)]
    assert _files(registry.data_dir / "tmp") == []


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_names_refused_with_nothing_written(registry, adapters, validate, bad):
    streamed = {FILES[0]: b"{}", FILES[1]: b""}
    calls = [
        lambda: registry.add_from_dir(bad, "v1", adapters["a"], validate),
        lambda: registry.add_from_dir("task", bad, adapters["a"], validate),
        lambda: registry.add_from_stream(bad, "v1", streamed, 1 << 20, validate),
        lambda: registry.add_from_stream("task", bad, streamed, 1 << 20, validate),
        lambda: registry.register_startup(bad, adapters["a"], validate),
        lambda: registry.get(bad, "v1"),
        lambda: registry.list(bad),
        lambda: registry.delete("task", bad, lambda task, version: False),
    ]
    for call in calls:
        with pytest.raises(InvalidName) as err:
            call()
        assert err.value.status == 400
    _assert_empty_store(registry)


def test_valid_names_accepted(registry, adapters, validate):
    for task, version in [("a" * 64, "v" * 64), ("my_task-2.b", "1.0.0-rc.1"), ("_x", "0")]:
        assert registry.add_from_dir(task, version, adapters["a"], validate).record.ref == f"{task}@{version}"


def test_pickle_weights_refused(registry, adapters, validate):
    for name in ("pickle", "both"):
        with pytest.raises(InvalidAdapter, match=r"pickle files are refused \(adapter_model.bin\)"):
            registry.add_from_dir("t", "v1", adapters[name], validate)
    config = (adapters["a"] / FILES[0]).read_bytes()
    pickled = (adapters["pickle"] / "adapter_model.bin").read_bytes()
    for key in ("adapter_model.bin", "model.pt", "../adapter_model.safetensors", "README.md"):
        with pytest.raises(InvalidAdapter):
            registry.add_from_stream("t", "v1", {FILES[0]: config, key: pickled}, 1 << 30, validate)
    _assert_empty_store(registry)


def test_stream_upload_and_byte_limit(registry, adapters, validate):
    files = {name: (adapters["a"] / name).read_bytes() for name in FILES}
    total = sum(map(len, files.values()))

    def chunked(data: bytes):
        for i in range(0, len(data), 100):
            yield data[i : i + 100]

    for limit in (total - 1, 10):
        streams = {FILES[0]: io.BytesIO(files[FILES[0]]), FILES[1]: chunked(files[FILES[1]])}
        with pytest.raises(TooLarge) as err:
            registry.add_from_stream("t", "v1", streams, limit, validate)
        assert err.value.status == 413
        _assert_empty_store(registry)
    streams = {FILES[0]: io.BytesIO(files[FILES[0]]), FILES[1]: chunked(files[FILES[1]])}
    record = registry.add_from_stream("t", "v1", streams, total, validate).record
    assert record.size_bytes == total
    assert record.sha256 == registry.add_from_dir("t", "v1", adapters["a"], validate).record.sha256


@pytest.mark.parametrize(
    ("variant", "error", "reason"),
    [
        ("nan", InvalidAdapter, "NaN or Inf"),
        ("dora", InvalidAdapter, "DoRA"),
        ("other_base", WrongBaseModel, "another base model"),
    ],
)
def test_invalid_adapters_refused_with_validator_reason(registry, adapters, validate, variant, error, reason):
    registry.add_from_dir("keep", "v1", adapters["c"], validate)
    before = (registry.list(), _files(registry.data_dir / "blobs"))
    with pytest.raises(error, match=reason) as err:
        registry.add_from_dir("t", "v1", adapters[variant], validate)
    assert err.value.status == 400
    files = {name: (adapters[variant] / name).read_bytes() for name in FILES}
    with pytest.raises(error, match=reason):
        registry.add_from_stream("t", "v1", files, 1 << 30, validate)
    assert (registry.list(), _files(registry.data_dir / "blobs")) == before
    assert _files(registry.data_dir / "tmp") == []


def test_validator_reason_names_the_source_not_the_temporary_copy(registry, adapters, validate):
    config = (adapters["a"] / FILES[0]).read_bytes()
    with pytest.raises(InvalidAdapter, match="the upload has no adapter_model.safetensors"):
        registry.add_from_stream("t", "v1", {FILES[0]: config}, 1 << 30, validate)
    with pytest.raises(InvalidAdapter, match=f"{re.escape(str(adapters['a'].parent))} has no adapter_config.json"):
        registry.add_from_dir("t", "v1", adapters["a"].parent, validate)
    _assert_empty_store(registry)
    assert _files(registry.data_dir / "tmp") == []


def test_declared_base_fingerprint_must_match(registry, adapters, validate, fingerprint):
    with pytest.raises(WrongBaseModel):
        registry.add_from_dir("t", "v1", adapters["a"], validate, base_fingerprint="0" * 64)
    _assert_empty_store(registry)
    assert registry.add_from_dir("t", "v1", adapters["a"], validate, base_fingerprint=fingerprint)


def test_delete_refused_while_protected(registry, adapters, validate):
    record = registry.add_from_dir("t", "v1", adapters["a"], validate).record
    with pytest.raises(Conflict, match="rollout"):
        registry.delete("t", "v1", lambda task, version: (task, version) == ("t", "v1"))
    assert registry.get("t", "v1") == record and registry.path_of(record).is_dir()


def test_register_startup_is_idempotent_across_restarts(tmp_path, adapters, validate, fingerprint):
    data, src = tmp_path / "data", tmp_path / "src"
    shutil.copytree(adapters["a"], src)
    with Registry(data, fingerprint) as reg:
        first = reg.register_startup("reverse", src, validate)
        assert first.version == first.sha256[:12]
    with Registry(data, fingerprint) as reg:
        assert reg.register_startup("reverse", src, validate) == first
        assert reg.list() == [first]
        shutil.rmtree(src)
        shutil.copytree(adapters["b"], src)  # the files changed between restarts
        second = reg.register_startup("reverse", src, validate)
        assert second.version == second.sha256[:12] != first.version
        assert reg.latest("reverse") == second
        shutil.rmtree(src)
        shutil.copytree(adapters["a"], src)  # and back: the existing version is served again
        assert reg.register_startup("reverse", src, validate) == first
        assert len(reg.list()) == 2
        with pytest.raises(InvalidAdapter, match="does not exist"):
            reg.register_startup("reverse", tmp_path / "missing", validate)


def test_wal_mode_and_schema_version(registry):
    registry.close()
    conn = connect(registry.data_dir)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        connect(registry.data_dir)


def test_threads_share_one_registry(registry, adapters, validate):
    errors: list[Exception] = []

    def add(task: str, version: str, adapter: str) -> None:
        try:
            registry.add_from_dir(task, version, adapters[adapter], validate)
            registry.list()
        except Exception as exc:  # collected and checked below
            errors.append(exc)

    jobs = [("t", f"v{i}", "a") for i in range(6)] + [("t", "same", "a")] * 3
    jobs += [("t", "race", "a"), ("t", "race", "b")]
    threads = [threading.Thread(target=add, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], Conflict)
    assert len(registry.list()) == 8
    blobs = {p.name for p in (registry.data_dir / "blobs").iterdir()}
    assert blobs == {record.sha256 for record in registry.list()}
    assert _files(registry.data_dir / "tmp") == []


def test_open_registry_keeps_uploads_of_another_instance(tmp_path, fingerprint):
    data = tmp_path / "data"
    with Registry(data, fingerprint):
        in_flight = data / "tmp" / "upload-inflight"
        in_flight.mkdir()
        with Registry(data, fingerprint):
            assert in_flight.exists()  # another Registry has the data dir open
    with Registry(data, fingerprint):
        assert not in_flight.exists()


_CRASH_CHILD = r"""
import sys, time
from functools import partial
from pathlib import Path
from peftserve.registry import store

mode, data_dir, model_dir, adapter_dir, marker, fingerprint = sys.argv[1:]
adapter_dir = Path(adapter_dir)

def stop_here():
    Path(marker).touch()
    time.sleep(600)

reg = store.Registry(data_dir, fingerprint)
if mode == "after_rename":  # files are in blobs/<sha>, the row is not committed yet
    from transformers import AutoModelForCausalLM
    from peftserve.lora.peft_adapter import load_adapter
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    real_fsync_dir = store._fsync_dir
    def fsync_dir_then_stop(path):
        real_fsync_dir(path)
        if Path(path) == Path(data_dir) / "blobs":
            stop_here()
    store._fsync_dir = fsync_dir_then_stop
    reg.add_from_dir("crash", "v1", adapter_dir, partial(load_adapter, model=model, max_rank=64))
else:  # mid-stream: the config is written, the weights half-written
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    def slow_weights():
        yield weights[: len(weights) // 2]
        stop_here()
        yield weights[len(weights) // 2 :]
    files = {"adapter_config.json": (adapter_dir / "adapter_config.json").read_bytes(),
             "adapter_model.safetensors": slow_weights()}
    reg.add_from_stream("crash", "v1", files, 1 << 30, lambda path: None)
sys.exit("the upload finished; it should have been killed first")
"""


@pytest.mark.parametrize("mode", ["mid_stream", "after_rename"])
def test_sigkill_mid_upload_leaves_no_trace(tmp_path, model_dir, adapters, validate, fingerprint, mode):
    data, marker = tmp_path / "data", tmp_path / "marker"
    with Registry(data, fingerprint) as reg:
        committed = [
            reg.add_from_dir("keep", "v1", adapters["a"], validate).record,
            reg.add_from_dir("keep", "v2", adapters["b"], validate).record,
        ]
    args = [mode, data, model_dir, adapters["c"], marker, fingerprint]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, *map(str, args)], cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()
            assert time.monotonic() < deadline, "the child never reached the crash point"
            time.sleep(0.05)
        if mode == "after_rename":
            assert len(list((data / "blobs").iterdir())) == 3  # the uncommitted blob is in place
        else:
            assert _files(data / "tmp")  # the partial upload is on disk
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    with Registry(data, fingerprint) as reg:
        assert reg.list() == committed
        assert _files(data / "tmp") == []
        assert sorted(p.name for p in (data / "blobs").iterdir()) == sorted(r.sha256 for r in committed)
        for record in committed:
            assert sorted(p.name for p in reg.path_of(record).iterdir()) == list(FILES)
        redo = reg.add_from_dir("crash", "v1", adapters["c"], validate).record  # the upload can be redone
        assert reg.get("crash", "v1") == redo


def test_base_fingerprint_shape_fields_only(model, model_dir):
    assert base_fingerprint(model.config) == base_fingerprint(model_dir) == base_fingerprint(model_dir / "config.json")
    qwen = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    assert base_fingerprint(qwen) == base_fingerprint(qwen.to_dict())  # head_dim absent from both
    assert base_fingerprint(qwen) == base_fingerprint({**qwen.to_dict(), "rope_theta": 1.0, "head_dim": 16})
    assert base_fingerprint(qwen) != base_fingerprint({**qwen.to_dict(), "hidden_size": 128})
    assert base_fingerprint(qwen) != base_fingerprint(model.config)


def test_sqlite_file_is_the_source_of_truth(registry, adapters, validate):
    record = registry.add_from_dir("t", "v1", adapters["a"], validate).record
    conn = sqlite3.connect(registry.data_dir / "peftserve.db")
    row = conn.execute("SELECT task, version, sha256, rank FROM adapters").fetchall()
    conn.close()
    assert row == [("t", "v1", record.sha256, 4)]


def test_two_registries_racing_on_one_version_create_it_once(tmp_path, adapters, validate, fingerprint):
    """The database decides (UNIQUE (task, version) inside the add's transaction), not a lock
    of one process: two Registry objects on one data directory race like two processes."""
    data = tmp_path / "data"
    with Registry(data, fingerprint) as first, Registry(data, fingerprint) as second:
        outcomes: list[tuple[str, object]] = []
        jobs = [(first, "a"), (second, "a"), (first, "a"), (second, "a"), (first, "b"), (second, "b")]
        barrier = threading.Barrier(len(jobs))

        def add(reg: Registry, adapter: str) -> None:
            barrier.wait()
            try:
                outcomes.append((adapter, reg.add_from_dir("t", "v1", adapters[adapter], validate)))
            except Conflict as exc:
                outcomes.append((adapter, exc))

        threads = [threading.Thread(target=add, args=job) for job in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        created = [(name, out.record) for name, out in outcomes if not isinstance(out, Conflict) and out.created]
        assert len(created) == 1, outcomes
        winner, record = created[0]
        for name, out in outcomes:
            if name == winner:
                assert not isinstance(out, Conflict) and out.record == record
            else:
                assert isinstance(out, Conflict)
        assert first.list() == second.list() == [record]
        assert _files(data / "blobs") == [record.sha256, *(f"{record.sha256}/{n}" for n in FILES)]
        assert _files(data / "tmp") == []


class _FailingCommit:
    """A connection whose COMMIT fails as SQLite's does on a full disk (the block is rolled back)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, *args):
        if sql == "COMMIT":
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorname = "SQLITE_FULL"
            raise error
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)


def test_a_failed_commit_leaves_no_blob_and_no_row(registry, adapters, validate, monkeypatch):
    kept = registry.add_from_dir("keep", "v1", adapters["c"], validate).record
    monkeypatch.setattr(registry, "_conn", _FailingCommit(registry._conn))
    with pytest.raises(StorageFull, match="data directory is full.*nothing was stored") as err:
        registry.add_from_dir("t", "v1", adapters["a"], validate)
    assert err.value.status == 507
    with pytest.raises(StorageFull, match="nothing was deleted"):
        registry.delete("keep", "v1", lambda task, version: False)
    monkeypatch.undo()
    assert registry.list() == [kept]
    assert _files(registry.data_dir / "blobs") == [kept.sha256, *(f"{kept.sha256}/{n}" for n in FILES)]
    assert _files(registry.data_dir / "tmp") == []


@pytest.mark.parametrize(("err", "error", "status"), [
    (errno.EROFS, StorageUnavailable, 503), (errno.EACCES, StorageUnavailable, 503),
    (errno.ENOSPC, StorageFull, 507), (errno.EDQUOT, StorageFull, 507),
])  # fmt: skip
def test_delete_that_cannot_move_the_blob_changes_nothing(
    registry, adapters, validate, monkeypatch, err, error, status
):
    record = registry.add_from_dir("t", "v1", adapters["a"], validate).record
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).parent == registry.data_dir / "blobs":
            raise OSError(err, os.strerror(err), str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(error, match=f"{errno.errorcode[err]}.*nothing was deleted") as raised:
        registry.delete("t", "v1", lambda task, version: False)
    monkeypatch.undo()
    assert raised.value.status == status
    assert registry.list() == [record] and registry.path_of(record).is_dir()
    assert _files(registry.data_dir / "tmp") == []


def test_open_puts_back_the_blob_of_an_uncommitted_delete(tmp_path, adapters, validate, fingerprint):
    data = tmp_path / "data"
    with Registry(data, fingerprint) as reg:
        record = reg.add_from_dir("t", "v1", adapters["a"], validate).record
        gone = reg.add_from_dir("t", "v2", adapters["b"], validate).record
    # A crash inside delete's transaction: the blob is moved to tmp/, the row is not deleted.
    (data / "tmp" / "delete-crashed").mkdir()
    os.rename(data / "blobs" / record.sha256, data / "tmp" / "delete-crashed" / record.sha256)
    # A crash after a commit: the row is gone, its blob still in tmp/ (and an orphan in blobs/).
    conn = sqlite3.connect(data / "peftserve.db")
    conn.execute("DELETE FROM adapters WHERE version = 'v2'")
    conn.commit()
    conn.close()
    (data / "tmp" / "delete-committed").mkdir()
    shutil.copytree(data / "blobs" / gone.sha256, data / "tmp" / "delete-committed" / gone.sha256)
    with Registry(data, fingerprint) as reg:
        assert reg.list() == [record]
        assert sorted(p.name for p in reg.path_of(record).iterdir()) == list(FILES)
        assert _files(data / "tmp") == []
        assert [p.name for p in (data / "blobs").iterdir()] == [record.sha256]
        assert validate(reg.path_of(record)).rank == 4
