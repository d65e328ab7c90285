"""The rollout snapshot: what ingress and engine replicas need from the controller, at one moment.

On Ray the controller owns the registry, the stable pointers and the rollouts; every ingress
replica routes with its own copy of the model table, and every engine replica fetches adapter
files by their sha256. Both poll the controller about every ``--snapshot-interval-s`` and get
a ``Snapshot``: the served tasks, their versions (with the sha256 of each) and stable versions,
the active rollouts (state and weight), the versions to take out of adapter slots, and the
engine fleet's figures. A snapshot is a plain, picklable record.

Ordering: ``key`` is ``(epoch, serial)``. The epoch is the controller's lease epoch
(``peftserve.registry.db.acquire_lease``: a restarted controller has a higher one), the serial
counts changes of the routing content within an epoch. A replica installs a snapshot only when
its key is higher than the one it holds, so a late answer never takes routing back. While the
controller is away, replicas keep routing with the last snapshot: rollout weights stay frozen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from peftserve.canary.router import Router
from peftserve.canary.spec import Rollout
from peftserve.server.model_table import ModelTable, ServedVersion, lora_id_of


@dataclass(frozen=True)
class VersionInfo:
    """One served version: where its files are shown to be, when it was made, its content address."""

    root: str
    created: int
    sha256: str


@dataclass(frozen=True)
class FleetView:
    """The engine replicas as the controller last heard from them."""

    replicas: tuple[str, ...] = ()
    """Engine replicas that reported recently."""
    stats: Mapping[str, float] = field(default_factory=dict)
    """``EngineStats`` fields summed over those replicas (``max_loras_in_step``: their maximum)."""
    tiers: Mapping[str, str] = field(default_factory=dict)
    """lora_id -> the best tier any replica holds it in (gpu, cpu; disk when none holds it)."""
    device: str = "unknown"
    dtype: str = "unknown"
    per_replica: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Replica -> its steps, generated tokens, running and waiting sequences (how the work was
    split)."""
    waiting: tuple[str, ...] = ()
    """Adapters that requests waiting on some replica need (vLLM's ``waiting_lora_adapters``)."""


@dataclass(frozen=True)
class Snapshot:
    """Routing state and fleet figures, as of ``taken_at``."""

    epoch: int
    serial: int
    tasks: Mapping[str, str]
    """Task -> stable version, for tasks that take traffic."""
    versions: Mapping[str, Mapping[str, VersionInfo]]
    """Task -> version -> its info, in registration order."""
    rollouts: tuple[Rollout, ...]
    """Active rollouts (shadow, ramping, paused), as the controller's router holds them."""
    evict: Mapping[str, float] = field(default_factory=dict)
    """lora_id -> when the controller asked engine replicas to take it out of their slots."""
    fleet: FleetView = field(default_factory=FleetView)
    taken_at: float = 0.0
    rollout_metrics: str = ""
    """The controller's rollout series (weight, state, judgments...) in Prometheus text format:
    every ingress replica exports them with its own series."""

    @property
    def key(self) -> tuple[int, int]:
        return (self.epoch, self.serial)

    def sha256(self, task: str, version: str) -> str | None:
        info = self.versions.get(task, {}).get(version)
        return info.sha256 if info is not None else None

    def served(self) -> dict[str, str]:
        """lora_id -> sha256 of every served version."""
        return {
            lora_id_of(t, v): i.sha256 for t, vs in self.versions.items() for v, i in vs.items()
        }


def routing_content(table: ModelTable) -> tuple[dict, dict, tuple[Rollout, ...]]:
    """The parts of the table a snapshot carries: stable versions, versions, active rollouts."""
    router = table.router
    tasks = dict(router.tasks)
    versions = {
        task: {v: VersionInfo(s.root, s.created, s.sha256) for v, s in served.items()}
        for task, served in table.versions.items()
    }
    rollouts = tuple(r for task in sorted(tasks) if (r := router.rollout(task)) is not None)
    return tasks, versions, rollouts


class SnapshotSource:
    """The controller's side: snapshots of its live model table, the serial raised on each change."""

    def __init__(
        self,
        table: ModelTable,
        epoch: int,
        fleet: Callable[[], FleetView] = FleetView,
        evict: Callable[[], Mapping[str, float]] = dict,
        clock: Callable[[], float] = time.time,
        metrics: Callable[[], str] = str,
    ) -> None:
        self._table = table
        self._epoch = epoch
        self._fleet = fleet
        self._evict = evict
        self._metrics = metrics
        self._clock = clock
        self._serial = 0
        self._content: Any = None

    def take(self) -> Snapshot:
        content = (*routing_content(self._table), dict(self._evict()))
        if content != self._content:
            self._content = content
            self._serial += 1
        tasks, versions, rollouts, evict = content
        return Snapshot(self._epoch, self._serial, tasks, versions, rollouts, evict,
                        self._fleet(), self._clock(), self._metrics())  # fmt: skip


def install(table: ModelTable, snapshot: Snapshot) -> None:
    """Make ``table`` route as ``snapshot`` says: its versions and a new router, swapped in at once."""
    versions = {
        task: {v: ServedVersion(i.root, i.created, i.sha256) for v, i in served.items()}
        for task, served in snapshot.versions.items()
    }
    router = Router()
    for task, stable in snapshot.tasks.items():
        router.set_task(task, stable, versions.get(task, {}))
    for rollout in snapshot.rollouts:
        router.set_rollout(rollout)
    table.versions, table.router = versions, router
