"""Which API model name means which engine adapter.

A request names the base model, a task (``"reverse"``) or a pinned version
(``"reverse@v2"``). A task's unpinned requests go where the canary ``Router``
(``peftserve.canary.router``) sends them: its stable version, or (once rollouts run) the
candidate. The engine knows adapters by ``lora_id = "task@version"``; metrics label
requests with the resolved (task, version), and the base model as (base name, "base").
Every answer names what served it in ``X-Peftserve-Version`` (``task@version``, or the base
model's name) and ``X-Peftserve-Arm`` (``stable``, ``candidate``, or ``pinned`` when the request
named the version), the ``arm`` its metrics carry too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from peftserve.canary.router import RouteDecision, Router, RoutingError
from peftserve.server.errors import invalid_request, model_not_found

BASE_VERSION = "base"
"""The version label of the base model (no adapter)."""
VERSION_HEADER = "X-Peftserve-Version"
"""Response header: ``task@version`` that served the request (the base model's name for the base model)."""
ARM_HEADER = "X-Peftserve-Arm"
"""Response header: ``stable``, ``candidate`` or ``pinned`` (:attr:`Target.served_arm`)."""


def lora_id_of(task: str, version: str) -> str:
    """The engine's adapter id of ``task@version``."""
    return f"{task}@{version}"


def twin_id_of(task: str, version: str) -> str:
    """The engine's adapter id of ``task@version``'s probe twin (same files, its own slot)."""
    return f"{task}@{version}#probe"


@dataclass(frozen=True)
class Target:
    """Where one request goes."""

    task: str
    version: str
    lora_id: str | None
    """None for the base model."""
    decision: RouteDecision | None = None
    """The router's decision (None for the base model)."""

    @property
    def arm(self) -> str:
        """``candidate`` or ``stable`` (the base model and tasks without a rollout: stable)."""
        return self.decision.arm if self.decision is not None else "stable"

    @property
    def served_arm(self) -> str:
        """The arm the response header and the request's metrics name: ``pinned`` when the
        request named its version (``task@version``), else :attr:`arm`."""
        return "pinned" if self.decision is not None and self.decision.reason == "pin" else self.arm

    def headers(self) -> dict[str, str]:
        """The response headers naming what served the request."""
        return {VERSION_HEADER: self.lora_id or self.task, ARM_HEADER: self.served_arm}


@dataclass(frozen=True)
class ModelEntry:
    """One servable model name (``GET /v1/models`` shows each as a model card)."""

    id: str
    created: int
    root: str
    parent: str | None = None
    max_model_len: int | None = None


@dataclass
class ServedVersion:
    root: str
    """The model card's ``root``: the adapter's content address (``sha256:...``)."""
    created: int = field(default_factory=lambda: int(time.time()))
    sha256: str = ""
    """The registry's content address of its files (engine replicas fetch them by it)."""


@dataclass
class ModelTable:
    """The base model, and every servable task with its versions and stable version."""

    base_name: str
    base_root: str
    """The base model card's ``root``: its directory's name, never a path on this server."""
    max_model_len: int
    created: int = field(default_factory=lambda: int(time.time()))
    router: Router = field(default_factory=Router)
    versions: dict[str, dict[str, ServedVersion]] = field(default_factory=dict)
    """task -> version -> card data, in registration order."""

    # ---- changes -------------------------------------------------------------------------

    def add_version(
        self, task: str, version: str, root: str, created: float | None = None, sha256: str = ""
    ) -> None:
        """Make ``task@version`` servable (pinned); a task takes traffic once it has a stable version."""
        if task == self.base_name:
            raise ValueError(
                f"task {task!r} has the base model's name; adapter names must be unique"
            )
        served = ServedVersion(
            root, int(created) if created is not None else int(time.time()), sha256
        )
        self.versions.setdefault(task, {})[version] = served
        stable = self.stable(task)
        if stable is not None:
            self.router.set_task(task, stable, self.versions[task])

    def set_stable(self, task: str, version: str) -> None:
        """Route ``task``'s unpinned requests to ``version`` (one of its versions)."""
        if version not in self.versions.get(task, {}):
            raise KeyError(f"{task}@{version} is not served")
        self.router.set_task(task, version, self.versions[task])

    def remove_version(self, task: str, version: str) -> None:
        """Stop serving ``task@version`` (never the stable one while the task has other versions)."""
        versions = self.versions.get(task, {})
        versions.pop(version, None)
        stable = self.stable(task)
        if not versions:
            self.versions.pop(task, None)
            self.router.remove_task(task)
        elif stable is not None and stable != version:
            self.router.set_task(task, stable, versions)

    # ---- reading ------------------------------------------------------------------------

    def stable(self, task: str) -> str | None:
        return self.router.tasks.get(task)

    @property
    def tasks(self) -> list[str]:
        """Tasks that take traffic (they have a stable version), sorted."""
        return sorted(self.router.tasks)

    def is_served(self, task: str, version: str) -> bool:
        return version in self.versions.get(task, {})

    def resolve(
        self,
        model: str,
        *,
        user: str | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str = "",
        is_admin: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> Target:
        """The target of a request's ``model``: 404 if unknown, 400 if malformed.

        ``is_admin``: the caller is authorized as admin, so its ``X-Canary`` header counts.
        """
        if model == self.base_name:
            return Target(self.base_name, BASE_VERSION, None)
        try:
            decision = self.router.route(
                model, user=user, headers=headers, request_id=request_id, is_admin=is_admin,
                metadata=metadata,
            )
        except RoutingError as exc:
            if exc.status == 404:
                raise model_not_found(model) from None
            raise invalid_request(str(exc), "model", "invalid_model") from None
        return Target(
            decision.task, decision.version, lora_id_of(decision.task, decision.version), decision
        )

    def fallback(self, target: Target) -> Target:
        """Where a failed candidate request goes instead: the stable arm of its task's rollout.

        The decision keeps the original bucket; its reason stays, but the stable answer is
        recorded outside the experiment by the caller (the failure already counted).
        """
        decision = target.decision
        if decision is None:
            raise ValueError("only routed requests have a fallback")
        rollout = self.router.rollout(decision.task)
        stable = rollout.spec.stable if rollout is not None else self.stable(decision.task)
        if stable is None:
            raise model_not_found(decision.task)
        fallback = replace(decision, version=stable, arm="stable", shadow=False, shadow_version=None)
        return Target(decision.task, stable, lora_id_of(decision.task, stable), fallback)

    def cards(self) -> list[ModelEntry]:
        """The base model, then each task (its stable version's files) and each ``task@version``."""
        cards = [ModelEntry(self.base_name, self.created, self.base_root, None, self.max_model_len)]
        for task in self.tasks:
            versions = self.versions.get(task, {})
            stable = versions.get(self.router.tasks[task])
            if stable is not None:
                cards.append(self._card(task, stable))
            cards.extend(self._card(lora_id_of(task, v), s) for v, s in versions.items())
        return cards

    def _card(self, model_id: str, served: ServedVersion) -> ModelEntry:
        return ModelEntry(model_id, served.created, served.root, self.base_name)

    def card(self, model: str) -> ModelEntry:
        for card in self.cards():
            if card.id == model:
                return card
        raise model_not_found(model)
