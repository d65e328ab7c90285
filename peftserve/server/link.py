"""An ingress replica's line to the controller (Ray Serve composition).

About every ``--snapshot-interval-s`` the replica calls the controller's ``sync`` once: it
pushes the samples recorded since the last call (``SampleBuffer``) and gets the latest
snapshot back, which it installs in its model table when it is newer than the one it holds.
Admin writes forwarded through this replica call ``refresh`` at once, so an upload is servable
here immediately and on every other replica within one interval.

Each push is a numbered batch. A batch whose call failed or timed out is sent again, before the
new one, until the controller acknowledges it; the controller skips a batch number it has
already applied for this replica, so a batch that arrived although its answer was lost is not
counted twice. While the controller is away the replica keeps routing with its last snapshot
and keeps its batches (bounded: ``MAX_UNACKED`` batches, the oldest dropped and counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from peftserve.server.model_table import ModelTable
from peftserve.server.samples import SampleBuffer, SampleCall
from peftserve.server.snapshot import Snapshot, install

logger = logging.getLogger(__name__)

Batch = tuple[int, list[SampleCall]]
"""(batch number, calls)."""
Sync = Callable[[str, list[Batch]], Awaitable[Snapshot]]
"""The controller's ``sync(source, batches)``."""
MAX_UNACKED = 600
CALL_TIMEOUT_INTERVALS = 5.0
"""A sync that takes this many intervals is abandoned (and its batches sent again)."""


class ControllerLink:
    """The latest snapshot, installed in ``table``; the samples, pushed (see the module docstring)."""

    def __init__(self, sync: Sync, table: ModelTable, source: str, interval_s: float) -> None:
        self._sync = sync
        self._table = table
        self.source = source
        self.interval_s = interval_s
        self.samples = SampleBuffer()
        self.snapshot: Snapshot | None = None
        self.dropped_batches = 0
        self._unacked: list[Batch] = []
        self._next = 1
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._failing_since: float | None = None

    def current(self) -> Snapshot | None:
        return self.snapshot

    async def refresh(self) -> None:
        """Push the pending samples and install the controller's snapshot if it is newer."""
        async with self._lock:
            calls = self.samples.take()
            if calls:
                self._unacked.append((self._next, calls))
                self._next += 1
            while len(self._unacked) > MAX_UNACKED:
                self._unacked.pop(0)
                self.dropped_batches += 1
            timeout = CALL_TIMEOUT_INTERVALS * self.interval_s
            snapshot = await asyncio.wait_for(self._sync(self.source, list(self._unacked)), timeout)
            self._unacked.clear()
            self.install(snapshot)

    def install(self, snapshot: Snapshot) -> bool:
        """Route by ``snapshot`` if it is newer than the one held; returns whether it was."""
        current = self.snapshot
        if current is not None and snapshot.key < current.key:
            return False
        if current is None or snapshot.key > current.key:
            install(self._table, snapshot)
        self.snapshot = snapshot
        return True

    async def first(self, timeout_s: float) -> None:
        """Wait for the first snapshot (the controller may still be starting)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self.refresh()
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no snapshot from the controller in {timeout_s:g} s: {exc}"
                    ) from exc
                await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="controller-link")

    async def stop(self) -> None:
        """Stop polling, after one last push of the pending samples."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.refresh()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception as exc:  # the controller is away: keep routing, keep the samples
                self._note_failure(exc)
            else:
                if self._failing_since is not None:
                    logger.info(
                        "controller reachable again after %.1f s",
                        time.monotonic() - self._failing_since,
                    )
                    self._failing_since = None

    def _note_failure(self, exc: Any) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            logger.warning(
                "the controller does not answer (%s: %s); routing on the last snapshot, %d sample batch(es) kept",
                type(exc).__name__, exc, len(self._unacked),
            )  # fmt: skip
