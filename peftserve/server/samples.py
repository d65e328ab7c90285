"""Samples on their way from an ingress replica to the controller's metric windows.

An ingress replica's request accounting (``peftserve.server.canary.RequestAccounting``) records
into a ``SampleBuffer`` instead of the metric windows: the buffer has the windows' recording
methods (``RECORDING``), and keeps each call as a ``SampleCall``: the method's name and its
arguments, the judge's own records (``peftserve.canary.samples.RequestRecord``: unit, stratum,
segments, outcome, step share, replica) in their plain form (``to_dict``), stamped with the
time it was made when the method takes one. About every ``--snapshot-interval-s`` the replica
takes the pending calls and pushes them to the controller in one batch, where ``apply``
replays them on the windows, in order (runs of records as one ``record_many``). So the judge
reads one set of windows holding the records of every ingress replica, each as it was made.

A push that fails (the controller is restarting) puts its calls back in front of the next one:
nothing is lost while the controller is away, up to ``max_pending`` calls (then the oldest are
dropped and counted). Feedback does not travel this way: it needs an answer, and goes to the
controller with the request (``POST /v1/feedback`` is forwarded).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from peftserve.canary.metrics import MetricWindows
from peftserve.canary.samples import RequestRecord

logger = logging.getLogger(__name__)

RECORDING = ("record", "record_many", "register_completion", "record_shadow", "record_noise_floor")
"""The methods of the metric windows an ingress calls; the only ones a batch may replay."""
RECORD_KEY = "request_record"
"""How a ``RequestRecord`` argument travels: ``{RECORD_KEY: record.to_dict()}``."""


def _takes_time(name: str) -> bool:
    params = inspect.signature(getattr(MetricWindows, name)).parameters
    return "at" in params


_STAMPED = frozenset(name for name in RECORDING if _takes_time(name))
"""Recording methods taking the sample's time as ``at=``: stamped when called, not when replayed
(a ``RequestRecord`` carries its own time)."""
MAX_PENDING = 200_000


def encode(value: Any) -> Any:
    """An argument in its plain form: records as dicts (lists of them too), the rest as is."""
    if isinstance(value, RequestRecord):
        return {RECORD_KEY: value.to_dict()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, RequestRecord) for v in value):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    """The inverse of ``encode``."""
    if isinstance(value, dict) and set(value) == {RECORD_KEY}:
        return RequestRecord.from_dict(value[RECORD_KEY])
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class SampleCall:
    """One recording call, its arguments encoded: ``getattr(windows, method)(*args, **kwargs)``."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class SampleBuffer:
    """The metric windows' recording methods, kept as calls until ``take``n. Thread-safe."""

    def __init__(
        self, *, max_pending: int = MAX_PENDING, clock: Callable[[], float] = time.time
    ) -> None:
        self._calls: deque[SampleCall] = deque()
        self._lock = threading.Lock()
        self._clock = clock
        self.max_pending = max_pending
        self.dropped = 0
        """Calls dropped because ``max_pending`` were waiting (the controller away too long)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name not in RECORDING:
            raise AttributeError(
                f"{type(self).__name__} records only {', '.join(RECORDING)}, not {name}"
            )

        def record(*args: Any, **kwargs: Any) -> None:
            if name in _STAMPED and kwargs.get("at") is None:
                kwargs["at"] = self._clock()
            args = tuple(encode(a) for a in args)
            kwargs = {k: encode(v) for k, v in kwargs.items()}
            self._append([SampleCall(name, args, kwargs)])

        return record

    def _append(self, calls: Iterable[SampleCall], *, front: bool = False) -> None:
        with self._lock:
            if front:
                self._calls.extendleft(reversed(list(calls)))
            else:
                self._calls.extend(calls)
            while len(self._calls) > self.max_pending:
                self._calls.popleft()
                self.dropped += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._calls)

    def take(self) -> list[SampleCall]:
        """Every pending call, oldest first (the buffer is empty afterwards)."""
        with self._lock:
            calls, self._calls = list(self._calls), deque()
        return calls

    def put_back(self, calls: list[SampleCall]) -> None:
        """Calls whose push failed, to go first in the next one."""
        self._append(calls, front=True)


def apply(windows: MetricWindows, calls: Iterable[SampleCall]) -> int:
    """Replay ``calls`` on ``windows`` in order; returns how many were applied.

    Consecutive ``record`` calls go in as one ``record_many``. A call to anything but a
    recording method is refused; one that raises is logged and skipped (a bad sample must not
    lose the rest of the batch).
    """
    applied = 0
    records: list[RequestRecord] = []

    def flush() -> int:
        if not records:
            return 0
        try:
            windows.record_many(records)
        except Exception:
            logger.exception("sample batch: %d records failed; skipped", len(records))
            return 0
        finally:
            count = len(records)
            records.clear()
        return count

    for call in calls:
        if call.method not in RECORDING:
            logger.warning("sample batch: %r is not a recording method; skipped", call.method)
            continue
        try:
            args = [decode(a) for a in call.args]
            kwargs = {k: decode(v) for k, v in call.kwargs.items()}
            if (
                call.method == "record"
                and not kwargs
                and len(args) == 1
                and isinstance(args[0], RequestRecord)
            ):
                records.append(args[0])
                continue
            applied += flush()
            getattr(windows, call.method)(*args, **kwargs)
        except Exception:
            logger.exception("sample batch: %s failed; skipped", call.method)
            continue
        applied += 1
    return applied + flush()
