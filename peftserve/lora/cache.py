"""Adapter memory tiers: GPU slots <- CPU cache <- disk.

* **GPU** (``LoRAManager``): ``LoRAConfig.max_loras`` slots; a step only runs adapters
  that sit in a slot.
* **CPU** (``AdapterCache``): an LRU of up to ``LoRAConfig.max_cpu_adapters`` prepared
  adapters in host memory (already in the slot dtype, pinned on CUDA), so making one
  resident is one copy per layer.
* **disk**: every registered adapter has a loader (reads and validates its files); its
  result is prepared and put in the CPU cache.

The tiers are exclusive: an adapter is in a slot, in the CPU cache or only on disk. A
resident adapter's host copy is kept with it, so leaving the GPU puts it back in the CPU
cache without reading the disk. ``AdapterTiers`` is driven by the engine thread, between
steps; only the loader jobs (``fetch_job``) may run on other threads.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from peftserve.lora.manager import LoRAManager, SlotsBusy
from peftserve.lora.peft_adapter import AdapterError, LoRAAdapter

logger = logging.getLogger(__name__)

Loader = Callable[[], LoRAAdapter]
"""Reads and validates an adapter (from disk); raises on failure."""
LoadCallback = Callable[[str, float, str], None]
"""(lora_id, seconds, source 'cpu' or 'disk'), called after each adapter is made resident."""


def prepare_host(adapter: LoRAAdapter, dtype: torch.dtype, pin: bool) -> LoRAAdapter:
    """``adapter`` with its tensors in the slot dtype and (``pin``) in pinned host memory.

    Rounding to ``dtype`` here gives the values the slot copy would give, so outputs do
    not change; it halves host memory and the copy for bf16/fp16 engines.
    """
    weights = {name: (_host(a, dtype, pin), _host(b, dtype, pin)) for name, (a, b) in adapter.weights.items()}
    return dataclasses.replace(adapter, weights=weights)


def _host(t: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    t = t.to(device="cpu", dtype=dtype).contiguous()
    return t.pin_memory() if pin and not t.is_pinned() else t


class AdapterCache:
    """The CPU tier: prepared adapters by id, least recently used first, at most ``capacity``."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the CPU adapter cache needs room for at least one adapter, not {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, LoRAAdapter] = OrderedDict()

    def __contains__(self, lora_id: object) -> bool:
        return lora_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def ids(self) -> list[str]:
        """Cached ids, least recently used first."""
        return list(self._items)

    def put(self, lora_id: str, adapter: LoRAAdapter) -> list[str]:
        """Insert (or refresh) as most recent; return the ids evicted to make room."""
        self._items[lora_id] = adapter
        self._items.move_to_end(lora_id)
        evicted = []
        while len(self._items) > self.capacity:
            old, _ = self._items.popitem(last=False)
            evicted.append(old)
        return evicted

    def pop(self, lora_id: str) -> LoRAAdapter | None:
        return self._items.pop(lora_id, None)


@dataclass
class Fetched:
    """The result of one loader job (run on any thread)."""

    lora_id: str
    version: int
    """Registration it was loaded for; a result for an older registration is dropped."""
    adapter: LoRAAdapter | None
    error: str | None
    seconds: float


@dataclass
class TierCounters:
    cpu_cache_hits: int = 0
    """Adapters made resident from the CPU cache."""
    cpu_cache_misses: int = 0
    """Disk loads started for an adapter that was needed and not in host memory."""
    adapter_loads: int = 0
    """Adapters written into a GPU slot."""
    adapter_evictions: int = 0
    """Adapters moved off the GPU (to make room, or by an unload)."""
    adapter_load_seconds_total: float = 0.0
    """Sum of the load times reported to ``on_load`` (disk read included for disk loads)."""


class AdapterTiers:
    """Registration, residency and eviction of adapters across GPU slots, CPU cache and disk.

    Eviction policy: an adapter leaves its slot only when it is idle, i.e. not in the
    ``busy`` set the caller passes (adapters of running sequences and of sequences being
    admitted); among idle ones the least recently used goes first, back to the CPU cache.

    Disk loads run inline, or through ``fetcher`` when one is set: it receives a job to
    run on another thread and must hand the job's ``Fetched`` back to ``fetched`` on the
    engine thread. Meanwhile the adapter's requests wait (``acquire`` answers None).
    """

    def __init__(self, gpu: LoRAManager, cpu_capacity: int, dtype: torch.dtype, pin: bool) -> None:
        self.gpu = gpu
        self.cpu = AdapterCache(cpu_capacity)
        self.dtype = dtype
        self.pin = pin
        self.counters = TierCounters()
        self.fetcher: Callable[[Callable[[], Fetched]], None] | None = None
        self.on_load: LoadCallback | None = None
        self.failed: dict[str, str] = {}
        """Adapters whose last disk load failed -> reason; the engine fails their requests."""
        self._loaders: dict[str, Loader] = {}
        self._versions: dict[str, int] = {}
        self._next_version = 0
        self._host: dict[str, LoRAAdapter] = {}  # host copies of the resident adapters
        self._loading: set[str] = set()  # disk loads in flight (fetcher)
        self._fresh: dict[str, float] = {}  # loaded from disk, not resident yet -> load seconds
        self._unloading: set[str] = set()  # unload asked while busy

    # -- registry ----------------------------------------------------------------------

    def register(self, lora_id: str, loader: Loader) -> None:
        """Register (or replace, dropping every older copy) ``lora_id``; nothing is read yet."""
        self.drop(lora_id)
        self._next_version += 1
        self._loaders[lora_id] = loader
        self._versions[lora_id] = self._next_version

    def add(self, lora_id: str, adapter: LoRAAdapter) -> int:
        """Register an adapter already in memory and make it resident if a slot is free.

        Returns its slot, or 0 when every slot is taken (it waits in the CPU cache).
        """
        prepared = self._prepare(adapter)
        self.register(lora_id, lambda: prepared)
        self._put_cpu(lora_id, prepared)
        if not self.gpu.num_free_slots:
            return 0
        return self._move_in(lora_id, set(), count_hit=False) or 0

    def drop(self, lora_id: str) -> None:
        """Forget ``lora_id`` in every tier (the caller makes sure it is idle)."""
        if self.gpu.is_loaded(lora_id):
            self.gpu.unload(lora_id)
        self.cpu.pop(lora_id)
        for table in (self._host, self._loaders, self._versions, self._fresh, self.failed):
            table.pop(lora_id, None)
        self._loading.discard(lora_id)
        self._unloading.discard(lora_id)

    def is_registered(self, lora_id: str) -> bool:
        return lora_id in self._loaders

    def status(self, lora_id: str) -> str:
        """'gpu', 'cpu' or 'disk' (KeyError if not registered)."""
        if lora_id not in self._loaders:
            raise KeyError(lora_id)
        return self._tier(lora_id)

    def statuses(self) -> dict[str, str]:
        """Every registered adapter's tier (a snapshot; tolerates being read from another thread)."""
        return {lora_id: self._tier(lora_id) for lora_id in list(self._loaders)}

    def _tier(self, lora_id: str) -> str:
        if self.gpu.is_loaded(lora_id):
            return "gpu"
        return "cpu" if lora_id in self.cpu else "disk"

    # -- what the scheduler asks -------------------------------------------------------

    def acquire(self, lora_id: str, busy: set[str]) -> int | None:
        """The adapter's slot, made resident now if it can be; None when it must wait.

        Evicts only an adapter outside ``busy``. An adapter on disk is read only when a
        slot can be had: inline (no fetcher), or by a background load (fetcher set) that
        a later call picks up.
        """
        if lora_id in self._unloading or lora_id in self.failed:
            return None
        if self.gpu.is_loaded(lora_id):
            return self.gpu.slot_of(lora_id)
        if not self._has_room(busy):
            return None
        if lora_id not in self.cpu:
            self._start_fetch(lora_id)
            if lora_id not in self.cpu:
                return None
        return self._move_in(lora_id, busy)

    def waits_for_slot(self, lora_id: str) -> bool:
        """After ``acquire`` answered None: True when the reason is that no slot can be had
        (not a disk load in flight, a failed load or a pending unload)."""
        return not (lora_id in self._loading or lora_id in self.failed or lora_id in self._unloading)

    def touch(self, lora_id: str) -> None:
        if self.gpu.is_loaded(lora_id):
            self.gpu.touch(lora_id)

    # -- admin -------------------------------------------------------------------------

    def make_resident(self, lora_id: str, busy: set[str]) -> int:
        """Load ``lora_id`` into a slot now (disk read inline if needed); SlotsBusy if all are busy."""
        self._unloading.discard(lora_id)
        if self.gpu.is_loaded(lora_id):
            self.gpu.touch(lora_id)
            return self.gpu.slot_of(lora_id)
        if not self._has_room(busy):
            self._refuse_busy()
        if lora_id not in self.cpu:
            self.counters.cpu_cache_misses += 1
            self.fetched(self.fetch_job(lora_id)())
            if lora_id in self.failed:
                raise AdapterError(self.failed.pop(lora_id))
        slot = self._move_in(lora_id, busy)
        if slot is None:
            self._refuse_busy()
        return slot

    def _refuse_busy(self) -> None:
        raise SlotsBusy(f"all {self.gpu.num_slots - 1} adapter slots hold adapters with running requests")

    def request_unload(self, lora_id: str, busy: set[str]) -> bool:
        """Move ``lora_id`` off the GPU now if idle (True); else when it becomes idle (False)."""
        if not self.gpu.is_loaded(lora_id):
            return True
        if lora_id in busy:
            self._unloading.add(lora_id)
            logger.info("adapter %s: unload deferred until its running requests end", lora_id)
            return False
        self._evict(lora_id)
        return True

    def apply_pending_unloads(self, busy: set[str]) -> None:
        """Carry out deferred unloads whose adapter is idle now."""
        for lora_id in [i for i in self._unloading if i not in busy]:
            self._unloading.discard(lora_id)
            if self.gpu.is_loaded(lora_id):
                self._evict(lora_id)

    # -- disk --------------------------------------------------------------------------

    def fetch_job(self, lora_id: str) -> Callable[[], Fetched]:
        """A job that runs the loader and prepares the result; safe to run on any thread."""
        loader, version = self._loaders[lora_id], self._versions[lora_id]

        def job() -> Fetched:
            start = time.perf_counter()
            try:
                adapter = self._prepare(loader())
            except Exception as exc:  # any loader failure is reported to the adapter's requests
                logger.debug("loading adapter %s failed", lora_id, exc_info=True)
                return Fetched(lora_id, version, None, _one_line(exc), time.perf_counter() - start)
            return Fetched(lora_id, version, adapter, None, time.perf_counter() - start)

        return job

    def needs_fetch(self, lora_id: str) -> bool:
        """True when ``lora_id`` is registered and only on disk, with no load in flight."""
        return (
            lora_id in self._loaders
            and lora_id not in self.cpu
            and lora_id not in self._loading
            and not self.gpu.is_loaded(lora_id)
        )

    def admin_fetch_job(self, lora_id: str) -> Callable[[], Fetched] | None:
        """A loader job for an explicit load, or None when no disk read is needed."""
        if not self.needs_fetch(lora_id):
            return None
        self.counters.cpu_cache_misses += 1
        return self.fetch_job(lora_id)

    def take_failures(self) -> dict[str, str]:
        """Adapters whose disk load failed since the last call -> reason."""
        failed, self.failed = self.failed, {}
        return failed

    def forget_loads(self) -> None:
        """Background loads will not report back (their thread pool is gone): forget them."""
        self._loading.clear()

    def prefetch(self, lora_id: str) -> None:
        """Start a background disk load now if one is needed (only with a fetcher)."""
        if self.fetcher is not None and self.needs_fetch(lora_id) and lora_id not in self.failed:
            self._start_fetch(lora_id)

    def fetched(self, result: Fetched) -> None:
        """Take a loader job's result (engine thread): into the CPU cache, or into ``failed``."""
        lora_id = result.lora_id
        if self._versions.get(lora_id) != result.version:
            logger.debug("adapter %s: dropped a load for an older registration", lora_id)
            return
        self._loading.discard(lora_id)
        if result.error is not None:
            logger.warning("adapter %s could not be loaded: %s", lora_id, result.error)
            self.failed[lora_id] = result.error
        elif not self.gpu.is_loaded(lora_id):
            self._fresh[lora_id] = result.seconds
            self._put_cpu(lora_id, result.adapter)

    def _start_fetch(self, lora_id: str) -> None:
        if lora_id in self._loading:
            return
        self.counters.cpu_cache_misses += 1
        job = self.fetch_job(lora_id)
        if self.fetcher is None:
            self.fetched(job())
            return
        self._loading.add(lora_id)
        logger.debug("adapter %s: loading from disk in the background", lora_id)
        self.fetcher(job)

    def _prepare(self, adapter: LoRAAdapter) -> LoRAAdapter:
        self.gpu.check(adapter)
        return prepare_host(adapter, self.dtype, self.pin)

    # -- moves between tiers -----------------------------------------------------------

    def _has_room(self, busy: set[str]) -> bool:
        return self.gpu.num_free_slots > 0 or any(i not in busy for i in self.gpu.lru())

    def _move_in(self, lora_id: str, busy: set[str], count_hit: bool = True) -> int | None:
        """CPU cache -> a slot, evicting the least recently used idle adapter if none is free;
        None (nothing moved) when every slot's adapter is in ``busy``."""
        if not self._has_room(busy):
            return None
        adapter = self.cpu.pop(lora_id)  # before an eviction refills the CPU cache
        if not self.gpu.num_free_slots:
            self._evict(next(i for i in self.gpu.lru() if i not in busy))
        return self._install(lora_id, adapter, count_hit)

    def _install(self, lora_id: str, adapter: LoRAAdapter, count_hit: bool) -> int:
        """Write ``adapter`` into a free slot; count and report the load."""
        start = time.perf_counter()
        slot = self.gpu.load(lora_id, adapter)
        seconds = time.perf_counter() - start
        self._host[lora_id] = adapter
        disk_seconds = self._fresh.pop(lora_id, None)
        source = "cpu" if disk_seconds is None else "disk"
        self.counters.cpu_cache_hits += count_hit and disk_seconds is None
        self._report_load(lora_id, seconds + (disk_seconds or 0.0), source)
        return slot

    def _report_load(self, lora_id: str, seconds: float, source: str) -> None:
        counters = self.counters
        counters.adapter_loads += 1
        counters.adapter_load_seconds_total += seconds
        logger.debug(
            "adapter %s loaded into slot %d from %s in %.1f ms", lora_id, self.gpu.slot_of(lora_id), source, seconds * 1e3
        )
        if self.on_load is not None:
            try:
                self.on_load(lora_id, seconds, source)
            except Exception:  # a metrics hook must never break a step
                logger.exception("on_adapter_load callback failed")

    def _evict(self, lora_id: str) -> None:
        """GPU -> CPU cache."""
        self.gpu.unload(lora_id)
        self.counters.adapter_evictions += 1
        self._put_cpu(lora_id, self._host.pop(lora_id))
        logger.debug("adapter %s evicted from its slot to the CPU cache", lora_id)

    def _put_cpu(self, lora_id: str, adapter: LoRAAdapter) -> None:
        for old in self.cpu.put(lora_id, adapter):
            self._fresh.pop(old, None)
            logger.debug("adapter %s dropped from the CPU cache (disk only now)", old)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
