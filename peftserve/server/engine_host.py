"""The engine host: one engine replica's services (Ray Serve composition).

An engine replica runs peftserve's async engine with its adapter tiers (GPU slots, CPU cache,
disk), exactly as one process does. What it adds is how adapters arrive, since the registry
lives with the controller:

- **by task**: Ray Serve's model multiplexing keeps a replica's *tasks* (the multiplexed model
  id is the task), least recently used first out. A ``TaskAdapters`` is one task on this
  replica: the versions of it registered in the engine. A request names its version and the
  sha256 of its files; the first request for a version registers it, and every version of the
  task shares the replica, so both arms of a rollout are served side by side. When Ray Serve
  drops the task, its versions are unregistered (running requests finish first);
- **by sha256**: ``AdapterFileCache`` keeps adapter files on the node, one directory per sha256
  (shared by the replicas of a node). A missing one is fetched from the controller through
  Ray's object store, checked against its sha256 and moved in place in one rename;
- **by snapshot**: with each poll of the controller the replica reports its figures and gets a
  snapshot; ``reconcile`` drops versions no longer served (deleted, or re-uploaded with other
  content) and frees the slots the controller asked to free (after a rollout's keep-warm time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

from peftserve.engine.engine import AsyncLLMEngine, UnknownAdapter
from peftserve.engine.outputs import RequestOutput
from peftserve.engine.sampling_params import SamplingParams
from peftserve.lora.peft_adapter import load_adapter
from peftserve.registry.digest import content_sha256, file_sha256
from peftserve.registry.store import STORED_FILES
from peftserve.server.fleet import EngineReport, ModelInfo, files_version
from peftserve.server.model_table import lora_id_of
from peftserve.server.snapshot import Snapshot

logger = logging.getLogger(__name__)

FetchFiles = Callable[[str], Awaitable[Mapping[str, bytes]]]
"""sha256 -> the adapter's files by name (the controller's ``adapter_files``)."""
SHA256_HEX = 64


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "peftserve-adapters"


class AdapterFileCache:
    """Adapter files on this node, one directory per sha256 (see the module docstring)."""

    def __init__(self, root: str | Path, fetch: FetchFiles) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._fetch = fetch
        self._locks: dict[str, asyncio.Lock] = {}
        self.fetched = 0
        """Adapters this replica fetched from the controller (the others were on the node)."""

    async def path(self, sha: str) -> Path:
        """The directory holding the adapter ``sha``'s files, fetched first if the node lacks it."""
        if len(sha) != SHA256_HEX or any(c not in "0123456789abcdef" for c in sha):
            raise UnknownAdapter(f"{sha[:80]!r} is not an adapter's sha256")
        path = self.root / sha
        if path.is_dir():
            return path
        lock = self._locks.setdefault(sha, asyncio.Lock())
        async with lock:
            if not path.is_dir():
                files = await self._fetch(sha)
                await asyncio.to_thread(self._store, sha, files)
                self.fetched += 1
        return path

    def _store(self, sha: str, files: Mapping[str, bytes]) -> None:
        staging = Path(tempfile.mkdtemp(prefix=f"tmp-{sha[:12]}-", dir=self.root))
        try:
            for name in STORED_FILES:
                if name in files:
                    (staging / name).write_bytes(files[name])
            got = content_sha256({n: file_sha256(staging / n) for n in STORED_FILES if n in files})
            if got != sha:
                raise OSError(f"adapter files fetched for {sha[:12]} hash to {got[:12]}")
            try:
                os.rename(staging, self.root / sha)
            except OSError:  # another replica of this node stored it first
                if not (self.root / sha).is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class TaskAdapters:
    """One task on this replica: its versions registered in the engine (Ray Serve's multiplexed
    "model"; Ray Serve calls ``__del__`` when it drops the task)."""

    def __init__(self, task: str, host: EngineHost) -> None:
        self.task = task
        self._host = host
        self.versions: dict[str, str] = {}
        """version -> sha256 registered in the engine."""
        self._lock = asyncio.Lock()

    async def ensure(self, version: str, sha: str) -> str:
        """Register ``task@version`` (files ``sha``) if it is not; returns its lora_id."""
        lora_id = lora_id_of(self.task, version)
        if self.versions.get(version) == sha:
            return lora_id
        async with self._lock:
            if self.versions.get(version) != sha:
                if version in self.versions:  # other content under that name now
                    await self.drop(version)
                path = await self._host.files.path(sha)
                await self._host.engine.register_lora(lora_id, self._host.loader(path, lora_id))
                self.versions[version] = sha
                logger.info("adapter %s (%s) registered on this replica", lora_id, sha[:12])
        return lora_id

    async def drop(self, version: str) -> None:
        """Unregister ``task@version`` here (its running requests finish first)."""
        self.versions.pop(version, None)
        lora_id = lora_id_of(self.task, version)
        if lora_id in self._host.engine.lora_status():
            await self._host.engine.unregister_lora(lora_id)

    async def release(self) -> None:
        """Unregister every version of the task here (Ray Serve dropped the task)."""
        self._host.forget(self)
        for version in list(self.versions):
            try:
                await self.drop(version)
            except Exception:  # the engine may be stopping; nothing to keep
                logger.debug("dropping %s@%s failed", self.task, version, exc_info=True)
        logger.info("task %s left this replica", self.task)

    def __del__(self) -> None:
        # Ray Serve calls it (from a worker thread) when it drops the task; the garbage
        # collector calls it again later, when nothing is left to release.
        loop = self._host.loop
        if self.versions and loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(self.release(), loop)


class EngineHost:
    """One engine replica: the async engine, its tasks, the node's adapter files."""

    def __init__(
        self, engine: AsyncLLMEngine, files: AdapterFileCache, name: str, max_rank: int
    ) -> None:
        self.engine = engine
        self.files = files
        self.name = name or f"engine-{uuid.uuid4().hex[:8]}"
        self.max_rank = max_rank
        self.tasks: dict[str, TaskAdapters] = {}
        """Tasks held now (Ray Serve's multiplexing adds and drops them)."""
        self.loop: asyncio.AbstractEventLoop | None = None
        """The replica's event loop (set by ``task``), where dropped tasks are released."""
        self._evicted: dict[str, float] = {}

    def loader(self, path: Path, lora_id: str) -> Callable[[], object]:
        model = self.engine.engine.model
        return lambda: load_adapter(path, model, self.max_rank, name=lora_id)

    def task(self, task: str) -> TaskAdapters:
        """A new holder for ``task`` (called by the multiplexed loader)."""
        self.loop = asyncio.get_running_loop()
        holder = TaskAdapters(task, self)
        self.tasks[task] = holder
        return holder

    def forget(self, holder: TaskAdapters) -> None:
        if self.tasks.get(holder.task) is holder:
            del self.tasks[holder.task]

    def info(self) -> ModelInfo:
        llm = self.engine.engine
        return ModelInfo(llm.max_model_len, llm.device.type, str(llm.dtype).removeprefix("torch."))

    def report(self) -> EngineReport:
        return EngineReport(self.name, self.engine.stats, dict(self.engine.lora_status()),
                            tuple(sorted(self.tasks)), self.info(), time.process_time(),
                            tuple(sorted(self.engine.waiting_lora_ids())))  # fmt: skip

    async def generate(
        self,
        holder: TaskAdapters | None,
        version: str,
        sha: str,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
    ) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request, each naming this replica."""
        lora_id = await holder.ensure(version, sha) if holder is not None else None
        outputs = self.engine.generate(request_id, prompt_ids, params, lora_id=lora_id)
        try:
            async for out in outputs:
                out.served_by = self.name
                yield out
        finally:
            await outputs.aclose()

    async def score(
        self,
        holder: TaskAdapters | None,
        version: str,
        sha: str,
        prompt_ids: list[int],
        target_ids: list[int],
    ) -> list[float]:
        lora_id = await holder.ensure(version, sha) if holder is not None else None
        return await self.engine.score(prompt_ids, target_ids, lora_id)

    async def load(self, holder: TaskAdapters, version: str, sha: str) -> int:
        return await self.engine.load_lora(await holder.ensure(version, sha))

    async def reconcile(self, snapshot: Snapshot) -> None:
        """Drop versions the snapshot no longer serves (or serves with other files), and probe
        twins of versions no active rollout compares any more; free the slots it asks to free."""
        served = snapshot.served()
        compared = {
            (r.spec.task, v) for r in snapshot.rollouts for v in (r.spec.stable, r.spec.candidate)
        }
        for holder in list(self.tasks.values()):
            for version, sha in list(holder.versions.items()):
                original = files_version(version)
                if served.get(lora_id_of(holder.task, original)) != sha:
                    logger.info(
                        "adapter %s@%s is no longer served; dropping it", holder.task, version
                    )
                    await holder.drop(version)
                elif original != version and (holder.task, original) not in compared:
                    logger.info("probe twin %s@%s is done; dropping it", holder.task, version)
                    await holder.drop(version)
        for lora_id, at in snapshot.evict.items():
            if self._evicted.get(lora_id) == at:
                continue
            self._evicted[lora_id] = at
            if self.engine.lora_status().get(lora_id) == "gpu":
                try:
                    await self.engine.unload_lora(lora_id)
                    logger.info("adapter %s unloaded from its slot (the controller asked)", lora_id)
                except Exception as exc:  # it is evicted later anyway
                    logger.info("unloading %s skipped: %s", lora_id, exc)
