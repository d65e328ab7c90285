"""Canary router: which version of a task serves a request.

Order of the rules, first match wins (each decision says which one applied, in ``reason``)::

    "model": "task@version"            -> that version                          reason "pin"
    no active rollout for the task      -> stable                                reason "no_rollout"
    X-Canary: always|never (admin only) -> candidate | stable                    reason "override"
    targeting rules do not all match    -> stable                                reason "targeting"
    bucket(task, key) < weight * 100    -> candidate, else stable (+ shadow?)    reason "hash"

The bucket is a keyed BLAKE2b hash of (task, routing key) into 10,000 buckets, the same in
every process and on every machine (Python's ``hash()`` is salted per process). A request goes
to the candidate when its bucket is below ``weight * 100``, so raising the weight only adds
buckets: no user ever moves back from candidate to stable during a rollout. The routing key is
the request's ``user`` field, else its ``X-Session-Id`` header, else the request id, so a user
(or a session) keeps one version across requests.

Shadow copies use a second, independent hash (a different BLAKE2b personalization): a stable
request of the cohort is also sent to the candidate when its shadow bucket is below
``shadow_percent * 100``. Independence matters: with the routing hash the shadow share would
be the users just above the canary threshold, exactly the ones the next step moves over.

Only ``reason == "hash"`` requests are a randomized comparison of the two versions
(:attr:`RouteDecision.in_experiment`); pins and overrides are self-selected, and targeting
excludes a cohort on purpose, so the metric windows should leave them out of the judgment.

The router holds task and version names only, never tensors; the controller updates it with
:meth:`Router.set_task` and :meth:`Router.set_rollout` on every transition. Each update
replaces an immutable entry, so ``route`` needs no lock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from peftserve.canary.samples import segment_labels, unit_id
from peftserve.canary.spec import Rollout

BUCKETS = 10_000
"""Routing granularity: weights are honoured to 0.01 %."""
ROUTE_PERSON = b"peftserve-route"
SHADOW_PERSON = b"peftserve-shadow"
CANARY_HEADER = "x-canary"
SESSION_HEADER = "x-session-id"

Arm = Literal["stable", "candidate"]
Reason = Literal["pin", "override", "targeting", "hash", "no_rollout"]


class RoutingError(ValueError):
    """A request the router cannot place; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where one request goes, and why."""

    task: str
    version: str
    """Version that serves the request."""
    arm: Arm
    """``candidate`` when ``version`` is the rollout's candidate, else ``stable``."""
    reason: Reason
    """The rule that decided: pin, override, targeting, hash or no_rollout."""
    shadow: bool
    """Also send a copy to ``shadow_version`` (the candidate) and discard its answer."""
    bucket: int
    """The request's routing bucket (0..9999), for audit and debugging; -1 when it had no key."""
    shadow_version: str | None = None
    """Target of the shadow copy when ``shadow`` is true."""
    unit: int = -1
    """The routed unit: :func:`~peftserve.canary.samples.unit_id` of the routing key (-1: none)."""
    weight: float = 0.0
    """The rollout's weight when the request was routed (its allocation stratum)."""
    labels: tuple[str, ...] = ()
    """Segment labels: the values of the rollout's targeting headers and the request's metadata."""

    @property
    def in_experiment(self) -> bool:
        """Whether this request is part of the randomized stable/candidate comparison."""
        return self.reason == "hash"


def parse_model(model: str) -> tuple[str, str | None]:
    """Split ``"task@version"`` into ``(task, version)``; a bare ``"task"`` gives ``(task, None)``."""
    if not isinstance(model, str):
        raise RoutingError(f"model must be a string, not {type(model).__name__}")
    task, sep, version = model.partition("@")
    if not task or (sep and not version) or "@" in version:
        raise RoutingError(f"model must be 'task' or 'task@version', not {model!r}")
    return task, (version if sep else None)


def _hash_bucket(task: str, key: str, person: bytes) -> int:
    # The unit separator keeps ("ab", "c") and ("a", "bc") apart. 2**64 mod 10,000 leaves a
    # bias of about 5e-16 per bucket, far below anything measurable.
    digest = hashlib.blake2b(f"{task}\x1f{key}".encode(), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def bucket(task: str, key: str) -> int:
    """Routing bucket of ``key`` for ``task``, in 0..9999, identical across processes."""
    return _hash_bucket(task, key, ROUTE_PERSON)


def shadow_bucket(task: str, key: str) -> int:
    """Shadow bucket, independent of :func:`bucket`, in 0..9999."""
    return _hash_bucket(task, key, SHADOW_PERSON)


def threshold(percent: float) -> int:
    """Number of buckets (out of 10,000) that ``percent`` covers."""
    return round(percent * BUCKETS / 100)


def lower_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Header names lower-cased (HTTP header names are case-insensitive)."""
    return {k.lower(): v for k, v in headers.items()} if headers else {}


def routing_key(user: str | None, headers: Mapping[str, str], request_id: str) -> str | None:
    """The user field, else the ``X-Session-Id`` header, else the request id (None if all are empty).

    ``headers`` must have lower-cased names (see :func:`lower_headers`). The source is part of
    the key so that a user called ``"abc"`` and a session called ``"abc"`` are different keys.
    """
    if user:
        return f"user:{user}"
    session = headers.get(SESSION_HEADER, "").strip()
    if session:
        return f"session:{session}"
    return f"request:{request_id}" if request_id else None


@dataclass(frozen=True)
class _TaskEntry:
    stable: str
    versions: frozenset[str]
    rollout: Rollout | None = None


class Router:
    """Routes requests of known tasks between stable and candidate versions."""

    def __init__(self) -> None:
        self._tasks: dict[str, _TaskEntry] = {}

    @property
    def tasks(self) -> dict[str, str]:
        """Known tasks and their stable versions."""
        return {task: e.stable for task, e in self._tasks.items()}

    def set_task(self, task: str, stable: str, versions: Iterable[str] = ()) -> None:
        """Register ``task`` served by ``stable``; ``versions`` may also be pinned. Keeps its rollout."""
        old = self._tasks.get(task)
        rollout = old.rollout if old is not None else None
        self._tasks[task] = _TaskEntry(stable, frozenset(versions) | {stable}, rollout)

    def remove_task(self, task: str) -> None:
        """Forget ``task`` (its requests then fail with 404)."""
        self._tasks.pop(task, None)

    def rollout(self, task: str) -> Rollout | None:
        """The active rollout of ``task``, if any."""
        entry = self._tasks.get(task)
        return entry.rollout if entry is not None else None

    def set_rollout(self, rollout: Rollout) -> None:
        """Install the current state of a rollout (call on every transition).

        An active rollout routes by its weight; a promoted one makes its candidate the task's
        stable version; a rolled-back one leaves stable as it was. Terminal rollouts are dropped.
        """
        spec = rollout.spec
        entry = self._tasks.get(spec.task)
        versions = (entry.versions if entry is not None else frozenset()) | {spec.stable, spec.candidate}
        if rollout.state == "promoted":
            self._tasks[spec.task] = _TaskEntry(spec.candidate, versions, None)
        elif rollout.state == "rolled_back":
            self._tasks[spec.task] = _TaskEntry(spec.stable, versions, None)
        else:
            self._tasks[spec.task] = _TaskEntry(spec.stable, versions, rollout)

    def clear_rollout(self, task: str) -> None:
        """Drop the task's rollout without changing its stable version."""
        entry = self._tasks.get(task)
        if entry is not None:
            self._tasks[task] = _TaskEntry(entry.stable, entry.versions, None)

    def route(
        self,
        model: str,
        *,
        user: str | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str = "",
        is_admin: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> RouteDecision:
        """Decide the version for one request.

        ``metadata`` (the request's labels) becomes segment labels of the decision, beside the
        values of the rollout's targeting headers. ``model`` is the request's model field
        (``task`` or ``task@version``); ``is_admin`` is
        true when the API has authorized the caller as admin, the only case in which an
        ``X-Canary`` header counts (from anyone else it is ignored, so a client cannot opt
        itself into or out of a canary). Raises :class:`RoutingError`: 404 for an unknown task
        or pinned version, 400 for a malformed model or an admin's invalid ``X-Canary`` value.
        """
        task, pin = parse_model(model)
        entry = self._tasks.get(task)
        if entry is None:
            raise RoutingError(f"unknown model {task!r}", status=404)
        hdrs = lower_headers(headers)
        key = routing_key(user, hdrs, request_id)
        b = bucket(task, key) if key is not None else -1
        rollout = entry.rollout
        candidate = rollout.spec.candidate if rollout is not None else None

        if pin is not None:
            if pin not in entry.versions:
                known = ", ".join(sorted(entry.versions))
                raise RoutingError(f"unknown version {pin!r} of {task!r} (known: {known})", status=404)
            arm: Arm = "candidate" if pin == candidate else "stable"
            return RouteDecision(task, pin, arm, "pin", False, b)

        if rollout is None:
            return RouteDecision(task, entry.stable, "stable", "no_rollout", False, b)
        stable = rollout.spec.stable
        unit = unit_id(key) if key is not None else -1
        headers_seen = {r.header: hdrs[r.header] for r in rollout.spec.targeting if r.header in hdrs}
        labels = segment_labels(None, headers_seen, metadata)
        extra = {"unit": unit, "weight": rollout.weight, "labels": labels}

        override = hdrs.get(CANARY_HEADER) if is_admin else None
        if override is not None:
            value = override.strip().lower()
            if value == "always":
                return RouteDecision(task, rollout.spec.candidate, "candidate", "override", False, b, **extra)
            if value == "never":
                return RouteDecision(task, stable, "stable", "override", False, b, **extra)
            raise RoutingError(f"X-Canary must be 'always' or 'never', not {override!r}")

        if not all(rule.matches(hdrs) for rule in rollout.spec.targeting):
            return RouteDecision(task, stable, "stable", "targeting", False, b, **extra)

        if key is None:
            raise RoutingError("a request needs a user, an X-Session-Id header or a request id to be routed")
        if b < threshold(rollout.weight):
            return RouteDecision(task, rollout.spec.candidate, "candidate", "hash", False, b, **extra)
        shadow = rollout.spec.shadow_percent > 0 and (
            shadow_bucket(task, key) < threshold(rollout.spec.shadow_percent)
        )
        return RouteDecision(task, stable, "stable", "hash", shadow, b, rollout.spec.candidate if shadow else None,
                             **extra)
