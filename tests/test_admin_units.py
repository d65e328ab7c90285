"""Admin pieces without a server: the streaming multipart reader, upload part rules, the model table."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import httpx
import pytest

from peftserve.registry import Conflict, InvalidAdapter, StorageUnavailable
from peftserve.server.adapters import AdapterService, read_upload
from peftserve.server.errors import APIError
from peftserve.server.model_table import ModelTable
from peftserve.server.multipart import MultipartError, MultipartReader, boundary_of

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _body(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, bytes]:
    files = [(n, (f, d, "application/octet-stream")) for n, f, d in parts if f is not None]
    fields = {n: d.decode() for n, f, d in parts if f is None}
    request = httpx.Request("PUT", "http://x/", files=files, data=fields)
    return request.read(), boundary_of(request.headers["content-type"])


def _chunks(body: bytes, size: int):
    return (body[i : i + size] for i in range(0, len(body), size))


@pytest.mark.parametrize("chunk", [1, 3, 64, 4096, 1 << 20])
def test_multipart_reader_at_any_chunking(chunk: int) -> None:
    # Data that holds CRLFs, dashes and a near-boundary must come back byte for byte.
    weights = random.Random(0).randbytes(20000) + b"\r\n--\r\n--" + b"-" * 40
    body, boundary = _body([("base_fingerprint", None, b"abc"), (CONFIG, CONFIG, b"{}"),
                            (WEIGHTS, WEIGHTS, weights)])  # fmt: skip
    reader = MultipartReader(_chunks(body, chunk), boundary)
    got = []
    while (part := reader.next_part()) is not None:
        got.append((part.name, part.filename, b"".join(part.chunks())))
    assert got == [("base_fingerprint", None, b"abc"), (CONFIG, CONFIG, b"{}"), (WEIGHTS, WEIGHTS, weights)]


def test_multipart_reader_skips_unread_parts_and_rejects_truncation() -> None:
    body, boundary = _body([(CONFIG, CONFIG, b"{}"), (WEIGHTS, WEIGHTS, b"x" * 5000)])
    reader = MultipartReader(_chunks(body, 100), boundary)
    assert [reader.next_part().name, reader.next_part().name, reader.next_part()] == [CONFIG, WEIGHTS, None]
    truncated = MultipartReader(_chunks(body[:-200], 100), boundary)
    truncated.next_part()
    with pytest.raises(MultipartError, match="ended"):
        b"".join(truncated.next_part().chunks())


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [("multipart/form-data; boundary=abc", True), ('multipart/form-data; boundary="a b"', True),
     ("application/octet-stream", False), ("multipart/form-data", False), (None, False)],
)  # fmt: skip
def test_boundary_of(content_type: str | None, ok: bool) -> None:
    if ok:
        assert boundary_of(content_type) in (b"abc", b"a b")
    else:
        with pytest.raises(MultipartError):
            boundary_of(content_type)


def _read(parts: list[tuple[str, str | None, bytes]]) -> tuple[dict[str, bytes], str | None]:
    body, boundary = _body(parts)
    seen: dict = {}

    def add(files, base):
        seen.update({k: v if isinstance(v, bytes) else b"".join(v) for k, v in files.items()})
        seen["base"] = base
        return "record"

    assert read_upload(MultipartReader(_chunks(body, 7), boundary), add) == "record"
    base = seen.pop("base")
    return seen, base


def test_read_upload_streams_config_then_weights() -> None:
    files, base = _read([("base_fingerprint", None, b"fp"), ("x", CONFIG, b"{}"), (WEIGHTS, "w.st", b"W")])
    assert files == {CONFIG: b"{}", WEIGHTS: b"W"} and base == "fp"


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([(WEIGHTS, WEIGHTS, b"W"), (CONFIG, CONFIG, b"{}")], "before"),
        ([(CONFIG, CONFIG, b"{}"), (CONFIG, CONFIG, b"{}")], "twice"),
        ([(CONFIG, CONFIG, b"{}"), (WEIGHTS, WEIGHTS, b"W"), ("x", "README.md", b"")], "unexpected part"),
        ([], None),
    ],
)
def test_read_upload_refuses_bad_part_orders(parts: list, message: str | None) -> None:
    if message is None:  # nothing but the closing boundary
        reader = MultipartReader(iter([b"--b--\r\n"]), b"b")
        with pytest.raises(InvalidAdapter, match="no files"):
            read_upload(reader, lambda files, base: None)
        return
    with pytest.raises(InvalidAdapter, match=message):
        _read(parts)


def test_model_table_routes_tasks_pins_and_base() -> None:
    table = ModelTable("base", "/m", 128)
    table.add_version("sum", "v1", "/a1")
    table.add_version("sum", "v2", "/a2")
    with pytest.raises(APIError) as info:  # no stable version yet: not served
        table.resolve("sum")
    assert info.value.status == 404
    table.set_stable("sum", "v1")
    assert table.resolve("base").lora_id is None and table.resolve("base").version == "base"
    assert (table.resolve("sum").lora_id, table.resolve("sum@v2").lora_id) == ("sum@v1", "sum@v2")
    for model, status in (("nope", 404), ("sum@v9", 404), ("sum@", 400)):
        with pytest.raises(APIError) as info:
            table.resolve(model)
        assert info.value.status == status
    assert [(c.id, c.root, c.parent) for c in table.cards()] == [
        ("base", "/m", None), ("sum", "/a1", "base"), ("sum@v1", "/a1", "base"), ("sum@v2", "/a2", "base"),
    ]  # fmt: skip
    table.remove_version("sum", "v2")
    assert table.tasks == ["sum"] and not table.is_served("sum", "v2")
    with pytest.raises(ValueError, match="base model"):
        table.add_version("base", "v1", "/x")


class _DeleteWorld:
    """An AdapterService over fakes that log the order of what delete changes."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.rows = {("sum", "v1"), ("sum", "v2")}
        self.loras = {"sum@v1": "gpu", "sum@v2": "cpu"}
        self.protected: set[tuple[str, str]] = set()
        self.storage_error: Exception | None = None
        table = ModelTable("base", "/m", 128)
        table.add_version("sum", "v1", "/a1")
        table.add_version("sum", "v2", "/a2")
        table.set_stable("sum", "v1")
        remove = table.remove_version
        table.remove_version = lambda t, v: (self.log.append("table"), remove(t, v))  # type: ignore[method-assign]
        self.table = table

        def record(task: str, version: str) -> SimpleNamespace:
            return SimpleNamespace(task=task, version=version, ref=f"{task}@{version}", created_at=0.0,
                                   sha256="0" * 64, to_dict=lambda: {})

        def delete(task: str, version: str, is_protected) -> SimpleNamespace:
            assert not is_protected(task, version)
            self.log.append("registry")
            if self.storage_error is not None:
                raise self.storage_error
            self.rows.discard((task, version))
            return record(task, version)

        async def unregister(lora_id: str) -> None:
            self.log.append("engine")
            self.loras.pop(lora_id)

        registry = SimpleNamespace(get=record, delete=delete, path_of=lambda r: f"/{r.version}")
        stable = SimpleNamespace(get=lambda task: table.stable(task))
        engine = SimpleNamespace(lora_status=lambda: dict(self.loras), unregister_lora=unregister)
        self.service = AdapterService(registry, stable, table, engine, max_rank=8, max_bytes=1)  # type: ignore[arg-type]
        self.service.protectors.append(lambda t, v: (t, v) in self.protected)


def test_delete_stops_serving_then_deletes_and_a_refusal_or_storage_failure_changes_nothing() -> None:
    world = _DeleteWorld()
    world.protected.add(("sum", "v2"))  # an active rollout's candidate
    with pytest.raises(Conflict, match="active rollout"):
        asyncio.run(world.service.delete("sum", "v2"))
    assert world.log == [] and world.table.is_served("sum", "v2") and "sum@v2" in world.loras
    assert ("sum", "v2") in world.rows
    world.protected.clear()
    world.storage_error = StorageUnavailable("cannot delete: not writable; nothing was deleted")
    with pytest.raises(StorageUnavailable):  # the registry refused: served again, engine untouched
        asyncio.run(world.service.delete("sum", "v2"))
    assert world.log == ["table", "registry"] and world.table.is_served("sum", "v2")
    assert "sum@v2" in world.loras and ("sum", "v2") in world.rows
    world.log.clear()
    world.storage_error = None
    deleted = asyncio.run(world.service.delete("sum", "v2"))
    assert deleted["deleted"] is True and deleted["status"] == "deleted"
    assert world.log == ["table", "registry", "engine"]
    assert not world.table.is_served("sum", "v2") and "sum@v2" not in world.loras and ("sum", "v2") not in world.rows
