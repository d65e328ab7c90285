"""Adapters end to end: the registry (files and metadata), stable pointers, model table, engine.

Every change goes through ``AdapterService`` so that the four agree:

- upload: the multipart stream is staged by the registry, validated by the engine's own
  ``load_adapter`` and committed; then the engine registers it (``lora_id = task@version``,
  loaded on demand), the model table serves it as ``task@version``, and a task's first
  version becomes its stable version (which serves plain ``"model": "task"``).
- upload: 201 for the one upload that created ``task@version`` (the registry's unique
  constraint decides between concurrent ones), 200 for the same content again, 409 for other
  content.
- delete: refused (409) for a task's stable version and for what ``protectors`` (the
  rollout layer) protect; otherwise model table, registry, engine (running requests finish)
  and metrics series, in that order. If the registry cannot delete (a read-only or full data
  directory: 503/507), the version is served again: a delete happens entirely or not at all.
- start-up: ``--adapter NAME=PATH`` is registered like an upload (a task's first version
  becomes stable; new content under an existing task is registered but does not take
  traffic), then every registered version made for this base model is served again.

Registry calls block: the async methods run them in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from anyio import from_thread, to_thread

from peftserve.engine.engine import UnknownAdapter
from peftserve.lora.manager import SlotsBusy
from peftserve.lora.peft_adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_adapter
from peftserve.registry import (
    AdapterRecord,
    Added,
    Conflict,
    InvalidAdapter,
    NotFound,
    Registry,
    TooLarge,
    validate_name,
)
from peftserve.server.errors import RETRY_AFTER_S, APIError
from peftserve.server.model_table import ModelTable, twin_id_of
from peftserve.server.multipart import MultipartReader, Part, boundary_of
from peftserve.server.stable import StablePointers, is_foreign_key_error

if TYPE_CHECKING:
    from torch import nn

    from peftserve.engine.engine import AsyncLLMEngine
    from peftserve.lora.peft_adapter import LoRAAdapter
    from peftserve.registry.store import StreamSource

logger = logging.getLogger(__name__)

T = TypeVar("T")
Protector = Callable[[str, str], bool]
"""``(task, version) -> True`` while that version must not be deleted."""

UPLOAD_FIELDS = ("base_fingerprint",)
"""Text fields an upload may carry besides its two files."""
MAX_FIELD_BYTES = 1024
MAX_CONFIG_BYTES = 1 << 20
MULTIPART_SLACK = 64 * 1024
"""Bytes of multipart framing allowed on top of --max-adapter-bytes."""


@dataclass
class AdapterService:
    """The adapters this server stores and serves."""

    registry: Registry
    stable: StablePointers
    table: ModelTable
    engine: AsyncLLMEngine
    max_rank: int
    max_bytes: int
    protectors: list[Protector] = field(default_factory=list)
    """Extra delete protection (the rollout layer adds its stable and candidate versions)."""
    on_delete: list[Callable[[str, str], None]] = field(default_factory=list)
    """Called with (task, version) after a version is deleted."""
    _serving: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    """Serializes serving a stored version (concurrent identical uploads serve it once)."""
    _runtime: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    """Serializes vLLM-style loads and unloads (a name's check and its change are one step)."""

    @property
    def model(self) -> nn.Module:
        """The engine's base model: uploads are validated against it, as the engine loads them."""
        return self.engine.engine.model

    def close(self) -> None:
        self.stable.close()
        self.registry.close()

    # ---- start-up (before the engine loop runs) ---------------------------------------------

    def register_startup(self, name: str, path: str | Path) -> AdapterRecord:
        """Register ``--adapter NAME=PATH``; the task's first version becomes its stable version."""
        if name == self.table.base_name:
            raise Conflict(f"adapter name {name!r} is the base model's name; pick another")
        record = self.registry.register_startup(name, path, self._validator(name))
        stable = self.stable.ensure(name, record.version)
        if stable != record.version:
            logger.warning(
                "adapter %s from %s is registered as %s, but %s@%s stays the stable version; "
                "pin it with model %r or roll it out", name, path, record.ref, name, stable, record.ref,
            )  # fmt: skip
        return record

    def restore(self) -> None:
        """Serve every registered version made for this base model."""
        by_task: dict[str, list[AdapterRecord]] = {}
        for record in self.registry.list():
            if record.base_fingerprint == self.registry.base_fingerprint:
                by_task.setdefault(record.task, []).append(record)
        pointers = self.stable.all()
        for task, records in by_task.items():
            self._restore_task(task, records, pointers.get(task))
        logger.info("serving %d tasks, %d adapter versions", len(self.table.tasks),
                    sum(len(v) for v in self.table.versions.values()))  # fmt: skip

    def _restore_task(self, task: str, records: list[AdapterRecord], stable: str | None) -> None:
        if task == self.table.base_name:
            logger.warning("task %s is not served: it has the base model's name", task)
            return
        if stable is None:  # its first upload was interrupted before the pointer was written
            stable = self.stable.ensure(task, records[0].version)
        if stable not in {r.version for r in records}:
            logger.warning("task %s is not served: its stable version %s is for another base model",
                           task, stable)  # fmt: skip
            return
        for record in records:
            if self._files_present(record):
                self.engine.engine.register_lora(record.ref, self._loader(record))
                self.table.add_version(task, record.version, self._root(record),
                                       record.created_at, record.sha256)  # fmt: skip
        if self.table.is_served(task, stable):
            self.table.set_stable(task, stable)

    # ---- admin -------------------------------------------------------------------------------

    async def upload(
        self,
        task: str,
        version: str,
        content_type: str | None,
        content_length: int | None,
        body: AsyncIterator[bytes],
    ) -> tuple[dict[str, Any], bool]:
        """Store and serve an uploaded adapter; return its view and whether it is new."""
        validate_name(task, "task name")
        validate_name(version, "version")
        if task == self.table.base_name:
            raise Conflict(f"task name {task!r} is the base model's name; pick another")
        limit = self.max_bytes + MULTIPART_SLACK
        if content_length is not None and content_length > limit:
            raise self._too_large()
        boundary = boundary_of(content_type)
        chunks = _pull(body, limit)
        record, created = await to_thread.run_sync(self._receive, task, version, boundary, chunks)
        if record.base_fingerprint != self.registry.base_fingerprint:
            raise Conflict(f"adapter {record.ref} is already registered for another base model")
        async with self._serving:
            if not self.table.is_served(task, version):
                await self._serve(record)
        return self.view(record), created

    def _receive(self, task: str, version: str, boundary: bytes, chunks: Iterator[bytes]) -> Added:
        def add(files: dict[str, StreamSource], base: str | None) -> Added:
            return self.registry.add_from_stream(
                task, version, files, self.max_bytes, self._validator(f"{task}@{version}"), base
            )

        try:
            return read_upload(MultipartReader(chunks, boundary), add)
        except TooLarge:
            raise self._too_large() from None

    async def _serve(self, record: AdapterRecord) -> None:
        # The stable pointer first: if it cannot be written, nothing is served yet and the same
        # upload again (200) serves it.
        stable = await to_thread.run_sync(self.stable.ensure, record.task, record.version)
        await self.engine.register_lora(record.ref, self._loader(record))
        self.table.add_version(record.task, record.version, self._root(record),
                               record.created_at, record.sha256)  # fmt: skip
        if self.table.stable(record.task) != stable:
            self.table.set_stable(record.task, stable)

    async def delete(self, task: str, version: str) -> dict[str, Any]:
        """Delete ``task@version``: 409 while it is protected, 404 if unknown."""
        validate_name(task, "task name")
        validate_name(version, "version")
        if await to_thread.run_sync(self.stable.get, task) == version:
            raise Conflict(
                f"adapter {task}@{version} is the stable version of task {task!r}: it serves the "
                "task's traffic and cannot be deleted"
            )
        record = await to_thread.run_sync(self.registry.get, task, version)  # 404 if unknown
        if await to_thread.run_sync(self.is_protected, task, version):  # refused: nothing changed
            raise Conflict(f"adapter {record.ref} is in use by an active rollout; end it first")
        # Out of the table first: no new request and no rollout can start on it, so the
        # registry's own protection check passes. If the registry cannot delete (503/507),
        # nothing was deleted and it is served again; otherwise the engine drops it once its
        # running requests end.
        served = self.table.is_served(task, version)
        self.table.remove_version(task, version)
        try:
            record = await to_thread.run_sync(
                self.registry.delete, task, version, self.is_protected
            )
        except Exception as exc:
            if served and self._files_present(record):
                self.table.add_version(task, version, self._root(record), record.created_at,
                                       record.sha256)  # fmt: skip
            if is_foreign_key_error(exc):
                raise Conflict(
                    f"adapter {task}@{version} is the stable version of its task"
                ) from None
            raise
        if record.ref in self.engine.lora_status():
            await self.engine.unregister_lora(record.ref)
        for hook in self.on_delete:
            hook(task, version)
        return {**self.view(record, {}), "status": "deleted", "deleted": True}

    def is_protected(self, task: str, version: str) -> bool:
        return self.stable.get(task) == version or self._in_rollout(task, version)

    def _in_rollout(self, task: str, version: str) -> bool:
        return any(p(task, version) for p in self.protectors)

    # ---- vLLM's runtime adapter API (POST /v1/load_lora_adapter, /v1/unload_lora_adapter) ----

    async def load_path(self, name: str, path: str) -> tuple[dict[str, Any], bool]:
        """Serve the adapter in directory ``path`` (on this server) as ``name``; return its
        view and whether it is new. Stored and validated like an upload.

        ``name`` is a task or ``task@version``. A new task's version is named after its
        content and becomes its stable version; the same content again changes nothing;
        other content for a registered task is refused (409: unload it first, or roll the new
        version out). ``task@version`` registers that version (pinned, when the task has a
        stable version already)."""
        task, pinned, version = name.partition("@")
        validate_name(task, "task name")
        if pinned:
            validate_name(version, "version")
        if task == self.table.base_name:
            raise Conflict(f"adapter name {task!r} is the base model's name; pick another")
        add = partial(
            self.registry.add_from_dir, task, version or None, path, self._validator(name),
            new_task_only=not pinned,
        )  # fmt: skip
        async with self._runtime:
            try:
                record, created = await to_thread.run_sync(add)
            except Conflict as exc:
                raise Conflict(
                    f"adapter {name!r} is loaded already, with other content ({exc}): unload it "
                    "first, or upload the new content as a version of the task and roll it out"
                ) from None
            if record.base_fingerprint != self.registry.base_fingerprint:
                raise Conflict(f"adapter {record.ref} is already registered for another base model")
            async with self._serving:
                if not self.table.is_served(task, record.version):
                    await self._serve(record)
        return self.view(record), created

    async def unload_name(self, name: str) -> None:
        """Stop serving ``name`` and drop it from the registry: ``task@version`` as ``delete``
        does (never a stable version), a task with all its versions (``retire``)."""
        task, pinned, version = name.partition("@")
        async with self._runtime:
            if pinned:
                await self.delete(task, version)
            else:
                await self.retire(task)

    async def retire(self, task: str) -> list[dict[str, Any]]:
        """Delete ``task`` entirely: its stable pointer and every version (404 if unknown; 409
        while an active rollout uses one of them). Out of the model table first; if the data
        directory cannot be written, what is still registered is served again."""
        validate_name(task, "task name")
        records = await to_thread.run_sync(self.registry.list, task)
        if not records:
            raise NotFound(f"task {task!r} has no registered adapter")
        for record in records:
            if await to_thread.run_sync(self._in_rollout, task, record.version):
                raise Conflict(f"adapter {record.ref} is in use by an active rollout; end it first")
        stable = await to_thread.run_sync(self.stable.get, task)
        records.sort(key=lambda r: r.version == stable)  # the stable version last
        for record in records:
            self.table.remove_version(task, record.version)
        deleted: list[AdapterRecord] = []
        try:
            await to_thread.run_sync(self.stable.remove, task)
            for record in records:
                await to_thread.run_sync(
                    self.registry.delete, task, record.version, self._in_rollout
                )
                deleted.append(record)
        except Exception:
            await self._serve_again(task, [r for r in records if r not in deleted], stable)
            raise
        for record in records:
            if record.ref in self.engine.lora_status():
                await self.engine.unregister_lora(record.ref)
            for hook in self.on_delete:
                hook(task, record.version)
        logger.info("task %s retired (%d versions)", task, len(records))
        return [{**self.view(r, {}), "status": "deleted", "deleted": True} for r in records]

    async def _serve_again(
        self, task: str, records: list[AdapterRecord], stable: str | None
    ) -> None:
        """After a failed ``retire``: serve what is still registered, under its stable version."""
        if stable is not None and any(r.version == stable for r in records):
            await to_thread.run_sync(self.stable.ensure, task, stable)
        for record in records:
            if self._files_present(record):
                self.table.add_version(task, record.version, self._root(record), record.created_at,
                                       record.sha256)  # fmt: skip
        if stable is not None and self.table.is_served(task, stable):
            self.table.set_stable(task, stable)

    async def load(self, task: str, version: str) -> dict[str, Any]:
        """Make ``task@version`` resident in an adapter slot."""
        record = await self._servable(task, version)
        await _engine_call(self.engine.load_lora, record.ref, "load")
        return self.view(record)

    async def probe_twin(self, task: str, version: str) -> str:
        """The adapter id of ``task@version``'s probe twin, registered on first use.

        A twin is the same adapter files under a second id, so it takes its own slot: a canary's
        probes run on twins of both versions, and both are then minority adapters in the same
        traffic (see :mod:`peftserve.canary.judge`, latency).
        """
        record = await self._servable(task, version)
        twin = twin_id_of(task, version)
        if twin not in self.engine.lora_status():
            await self.engine.register_lora(twin, self._loader(record))
        return twin

    async def drop_probe_twin(self, task: str, version: str) -> None:
        """Unregister ``task@version``'s probe twin, if any (its requests drain first)."""
        twin = twin_id_of(task, version)
        if twin in self.engine.lora_status():
            await self.engine.unregister_lora(twin)

    async def unload(self, task: str, version: str) -> dict[str, Any]:
        """Free the slot of ``task@version`` (it stays registered)."""
        record = await self._servable(task, version)
        await _engine_call(self.engine.unload_lora, record.ref, "unload")
        return self.view(record)

    async def list(self, task: str | None = None) -> list[dict[str, Any]]:
        records = await to_thread.run_sync(self.registry.list, task)
        statuses = self.engine.lora_status()
        return [self.view(r, statuses) for r in records]

    async def get(self, task: str, version: str) -> dict[str, Any]:
        return self.view(await to_thread.run_sync(self.registry.get, task, version))

    async def task(self, task: str) -> dict[str, Any]:
        """The task: its stable version and every version."""
        versions = await self.list(task)
        if not versions:
            raise NotFound(f"task {task!r} has no registered adapter")
        stable = await to_thread.run_sync(self.stable.get, task)
        return {"object": "task", "task": task, "stable": stable, "versions": versions}

    def view(self, record: AdapterRecord, statuses: dict[str, str] | None = None) -> dict[str, Any]:
        """JSON of one version: the record, whether it is stable, and where it is (gpu/cpu/disk)."""
        if statuses is None:
            statuses = self.engine.lora_status()
        served = self.table.is_served(record.task, record.version)
        return {
            "object": "adapter",
            "id": record.ref,
            **record.to_dict(),
            "stable": self.table.stable(record.task) == record.version,
            "status": statuses.get(record.ref, "disk") if served else "unservable",
        }

    # ---- helpers -----------------------------------------------------------------------------

    def _validator(self, name: str) -> Callable[[Path], Any]:
        return lambda path: load_adapter(path, self.model, self.max_rank, name=name)

    def _loader(self, record: AdapterRecord) -> Callable[[], LoRAAdapter]:
        def load() -> LoRAAdapter:
            return load_adapter(
                self.registry.path_of(record), self.model, self.max_rank, name=record.ref
            )

        return load

    def _files_present(self, record: AdapterRecord) -> bool:
        try:
            self.registry.path_of(record)
        except NotFound as exc:
            logger.error("adapter %s is not served: %s", record.ref, exc)
            return False
        return True

    def _root(self, record: AdapterRecord) -> str:
        """The model card's ``root``: the content address, never a path on this server."""
        return f"sha256:{record.sha256}"

    async def _servable(self, task: str, version: str) -> AdapterRecord:
        record = await to_thread.run_sync(self.registry.get, task, version)
        if record.ref not in self.engine.lora_status():
            raise Conflict(
                f"adapter {record.ref} is not served here (it was made for another base model)"
            )
        return record

    def _too_large(self) -> TooLarge:
        return TooLarge(
            f"the upload is larger than the limit of the server ({self.max_bytes} bytes of adapter "
            "files; the server's --max-adapter-bytes)"
        )


def read_upload(
    reader: MultipartReader, add: Callable[[dict[str, StreamSource], str | None], T]
) -> T:
    """Read the parts and hand them to ``add`` (the registry): the config part whole, then the
    weights part as a stream. The config must come first; nothing may follow the weights."""
    config: bytes | None = None
    fields: dict[str, str] = {}
    while (part := reader.next_part()) is not None:
        name = _part_name(part)
        if part.filename is None and part.name in UPLOAD_FIELDS:
            fields[name] = (
                _read_limited(part, MAX_FIELD_BYTES).decode("utf-8", errors="replace").strip()
            )
        elif name == CONFIG_NAME:
            if config is not None:
                raise InvalidAdapter(f"{CONFIG_NAME} is sent twice")
            config = _read_limited(part, MAX_CONFIG_BYTES)
        else:
            files: dict[str, StreamSource] = {} if config is None else {CONFIG_NAME: config}
            files[name] = _last_part(reader, part, name)
            return add(files, fields.get("base_fingerprint") or None)
    if config is None:
        raise InvalidAdapter(
            f"the upload holds no files: send {CONFIG_NAME} and {WEIGHTS_NAME} as multipart parts"
        )
    return add({CONFIG_NAME: config}, fields.get("base_fingerprint") or None)


def _part_name(part: Part) -> str:
    """The stored file a part is: its field name if that is a stored name, else its file name."""
    if part.name in (CONFIG_NAME, WEIGHTS_NAME):
        return part.name
    name = part.filename or part.name
    if not name:
        raise InvalidAdapter("a multipart part has neither a name nor a filename")
    return name


def _read_limited(part: Part, limit: int) -> bytes:
    try:
        return part.read(limit)
    except OverflowError:
        raise InvalidAdapter(f"part {_part_name(part)!r} is longer than {limit} bytes") from None


def _last_part(reader: MultipartReader, part: Part, name: str) -> Iterator[bytes]:
    """The part's data; then the body must end."""
    yield from part.chunks()
    extra = reader.next_part()
    if extra is None:
        return
    extra_name = extra.filename or extra.name
    if extra_name == CONFIG_NAME:
        raise InvalidAdapter(f"send {CONFIG_NAME} before {name} in the upload")
    raise InvalidAdapter(f"unexpected part {str(extra_name)[:80]!r} after {name}: an upload holds "
                         f"only {CONFIG_NAME} and {WEIGHTS_NAME}")  # fmt: skip


def _pull(body: AsyncIterator[bytes], limit: int) -> Iterator[bytes]:
    """The request body, read from a worker thread; TooLarge past ``limit`` bytes."""
    total = 0
    while (chunk := from_thread.run(_next_chunk, body)) is not None:
        total += len(chunk)
        if total > limit:
            raise TooLarge("the upload is larger than the limit of the server")
        yield chunk


async def _next_chunk(body: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await body.__anext__()
    except StopAsyncIteration:
        return None


async def _engine_call(fn: Callable[[str], Any], lora_id: str, what: str) -> None:
    """``fn(lora_id)``; SlotsBusy -> 503 (retry), UnknownAdapter -> 404, a failed load -> 500."""
    try:
        await fn(lora_id)
    except SlotsBusy as exc:
        raise APIError(503, f"cannot {what} adapter {lora_id}: {exc}", "server_error", None,
                       "slots_busy", {"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
    except UnknownAdapter as exc:
        raise NotFound(str(exc)) from None
    except AdapterError as exc:
        logger.error("adapter %s could not be loaded: %s", lora_id, exc)
        raise APIError(500, f"cannot {what} adapter {lora_id}: {exc}", "server_error", None,
                       f"{what}_failed") from None  # fmt: skip
