"""The engine replicas seen from the ingress and the controller (Ray Serve composition).

``RemoteEngine`` is the engine deployment through a Ray Serve handle, shaped like
``AsyncLLMEngine`` where the services use one (``generate``, ``score``, ``lora_status``,
``stats``, adapter loads, and ``.engine`` for the tokenizer, context, device and dtype), so the
routes, the canary accounting, the probes and the adapter service run on it unchanged:

- a request for ``task@version`` goes to the deployment with the *task* as Ray Serve's
  multiplexed model id and the version (and the sha256 of its files, from the snapshot) as
  arguments, so both arms of a rollout land on the replicas that hold the task; a canary probe
  on a version's *probe twin* (``task@version#probe``) goes the same way, with the files of
  ``version``;
- a replica that dies under a request (``RayActorError``: killed, its node removed) costs one
  retry on another replica: from the start if it had sent nothing, else as a *continuation*
  (the prompt plus the tokens already delivered, for the tokens left; a seeded or penalized
  sampling goes on from there, not as the same draw), so no client request is lost and none
  is answered twice. A request with several choices (``n`` > 1) that had delivered tokens, a
  scoring request, or a second loss answers 503 (``replica_lost``). Such failures are the
  fleet's, never the version's: nothing of them reaches the metric windows;
- errors the engine raises before its first output (a full queue, a bad parameter) come back
  as the engine's own exception types, not wrapped by Ray.

``ModelView`` is what a process without the model reads of it: the tokenizer and config from
the model directory, the context length, device and dtype the engine replicas report, and a
weightless copy of the model on the ``meta`` device that adapters are validated against (the
controller's registry refuses exactly what an engine would), and the engine settings with the
fleet's waiting queue, so the routes' early 429 holds when every replica's queue is full (each
replica checks again on submit).

``FleetState`` is the controller's record of the engine replicas' reports (stats, adapter
tiers), folded into the ``FleetView`` every snapshot carries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from peftserve.config import EngineConfig
from peftserve.engine.engine import EngineStats, UnknownAdapter
from peftserve.engine.outputs import RequestOutput
from peftserve.engine.sampling_params import SamplingParams
from peftserve.server.errors import RETRY_AFTER_S, APIError
from peftserve.server.model_table import lora_id_of, twin_id_of
from peftserve.server.snapshot import FleetView, Snapshot

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

TIER_ORDER = {"gpu": 0, "cpu": 1, "disk": 2}
CALL_TIMEOUT_S = 120.0
"""Longest wait for a unary engine call (a load, a scoring): with no engine replica up, the
controller's restore and rounds go on instead of waiting for one."""
REPORT_TTL_INTERVALS = 5
"""A replica not heard from for this many report intervals is left out of the fleet."""


@dataclass(frozen=True)
class ModelInfo:
    """What an engine replica says about the model it serves."""

    max_model_len: int
    device: str
    dtype: str


@dataclass(frozen=True)
class EngineReport:
    """One engine replica's figures, sent to the controller with each snapshot poll."""

    replica: str
    stats: EngineStats
    tiers: Mapping[str, str]
    """lora_id -> gpu, cpu or disk on this replica."""
    tasks: tuple[str, ...]
    """Tasks this replica holds (its multiplexed models)."""
    info: ModelInfo
    cpu_s: float = 0.0
    """CPU seconds the replica's process has used (how much of the machine it got)."""
    waiting: tuple[str, ...] = ()
    """Adapters that requests waiting on this replica need."""


class ReplicaLost(APIError):
    """The engine replica serving a request died, and so did the one that retried it."""

    def __init__(self, request_id: str) -> None:
        super().__init__(
            503,
            f"The engine replica serving request {request_id} was lost, twice; try again.",
            "server_error", None, "replica_lost", {"Retry-After": str(RETRY_AFTER_S)},
        )  # fmt: skip


def replica_gone(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica (or its node) went away, as opposed to the request failing."""
    from ray import exceptions

    return isinstance(exc, (exceptions.RayActorError, exceptions.NodeDiedError))


def unwrap(exc: BaseException) -> BaseException:
    """The exception a replica raised, without Ray's wrapper (its class, attributes and message)."""
    from ray import exceptions

    cause = getattr(exc, "cause", None) if isinstance(exc, exceptions.RayTaskError) else None
    return cause if isinstance(cause, BaseException) else exc


TWIN_MARK = twin_id_of("t", "v").removeprefix(lora_id_of("t", "v"))
"""What a probe twin's version adds to the version it copies (``v2`` -> ``v2#probe``)."""


def files_version(version: str) -> str:
    """The version whose files ``version`` serves: itself, or the original of a probe twin."""
    return version.removesuffix(TWIN_MARK)


def split_lora_id(lora_id: str) -> tuple[str, str]:
    task, sep, version = lora_id.partition("@")
    if not sep:
        raise UnknownAdapter(f"adapter id {lora_id!r} is not task@version")
    return task, version


class ModelView:
    """The model as a process without its weights sees it (see the module docstring)."""

    def __init__(self, model_dir: str, info: ModelInfo, config: EngineConfig | None = None) -> None:
        import torch

        from peftserve.engine.model_runner import load_tokenizer, read_model_config

        self.model_dir = model_dir
        self.info = info
        self.tokenizer = load_tokenizer(model_dir)
        self.model_config = read_model_config(model_dir)
        self.max_model_len = info.max_model_len
        self.device = torch.device(info.device)
        self.dtype: torch.dtype = getattr(torch, info.dtype.removeprefix("torch."))
        self.config = config if config is not None else EngineConfig()
        """The engine replicas' settings (``scheduler.max_waiting``: each replica's queue)."""
        self.waiting: Callable[[], int] = lambda: 0
        """The fewest requests waiting on one engine replica (set by ``RemoteEngine``)."""

    @property
    def num_waiting(self) -> int:
        """Requests waiting on the least loaded engine replica, per the latest snapshot: when it
        is full, so is every other, and the route answers 429 before doing any work."""
        return self.waiting()

    @cached_property
    def model(self) -> nn.Module:
        """The base model without weights (``meta`` device) in the serving dtype, for validation."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.model_config, dtype=self.dtype)

    def register_lora(self, lora_id: str, loader: Callable[[], Any]) -> None:
        """Nothing to do: engine replicas register a version when a request first needs it."""


class RemoteEngine:
    """The engine deployment through a Ray Serve handle (see the module docstring)."""

    def __init__(
        self,
        handle: Any,
        view: ModelView,
        snapshot: Callable[[], Snapshot | None],
    ) -> None:
        self._handle = handle
        self._view = view
        self._snapshot = snapshot
        view.waiting = self._fewest_waiting
        self.evict: dict[str, float] = {}
        """lora_id -> when the controller asked the replicas to free its slots (``unload_lora``)."""
        self.retries: dict[str, int] = {}
        """Requests retried on another replica after theirs died, by lora_id ("" for the base model)."""
        self.on_adapter_load: Callable[[str, float, str], None] | None = None
        """Unused: adapter loads happen on the engine replicas, which export them themselves."""

    # ---- what the services read -----------------------------------------------------

    @property
    def engine(self) -> ModelView:
        return self._view

    @property
    def stats(self) -> EngineStats:
        snapshot = self._snapshot()
        return stats_of(snapshot.fleet.stats if snapshot is not None else {})

    @property
    def is_running(self) -> bool:
        """Whether an engine replica reported recently (per the latest snapshot)."""
        snapshot = self._snapshot()
        return snapshot is not None and bool(snapshot.fleet.replicas)

    def waiting_lora_ids(self) -> set[str]:
        """Adapters that requests waiting on any engine replica need (per the latest snapshot)."""
        snapshot = self._snapshot()
        return set(snapshot.fleet.waiting) if snapshot is not None else set()

    def _fewest_waiting(self) -> int:
        snapshot = self._snapshot()
        per_replica = snapshot.fleet.per_replica if snapshot is not None else {}
        return int(min((r.get("num_waiting", 0) for r in per_replica.values()), default=0))

    def lora_status(self) -> dict[str, str]:
        """Every served version's best tier over the replicas ('disk' where none holds it)."""
        snapshot = self._snapshot()
        if snapshot is None:
            return {}
        tiers = snapshot.fleet.tiers
        return {lora_id: tiers.get(lora_id, "disk") for lora_id in snapshot.served()}

    def start(self) -> None:
        """Nothing to start: the replicas run on their own."""

    def shutdown(self, timeout: float = 0.0) -> None:
        """Nothing to stop: the replicas run on their own."""

    # ---- requests -------------------------------------------------------------------

    def _target(self, lora_id: str | None) -> tuple[str, str, str]:
        """(task, version, sha256) of ``lora_id`` ("", "", "" for the base model)."""
        if lora_id is None:
            return "", "", ""
        task, version = split_lora_id(lora_id)
        snapshot = self._snapshot()
        sha = snapshot.sha256(task, files_version(version)) if snapshot is not None else None
        if not sha:
            raise UnknownAdapter(f"adapter {lora_id!r} is not registered")
        return task, version, sha

    def _call(self, method: str, task: str, stream: bool = False) -> Any:
        return getattr(self._handle.options(stream=stream, multiplexed_model_id=task), method)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs from a replica holding its task; one retry if it dies."""
        task, version, sha = self._target(lora_id)
        delivered: list[int] = []
        ended = 0  # choices finished
        retried = False
        while True:
            prompt, rest, before = prompt_token_ids + delivered, params, len(delivered)
            if delivered:  # continue after what was delivered, for the tokens left
                rest = replace(params, max_tokens=params.max_tokens - len(delivered), seed=None,
                               prompt_logprobs=None)  # fmt: skip
            engine_id = request_id if not retried else f"{request_id}-retry"
            stream = self._call("generate", task, stream=True).remote(
                version, sha, engine_id, prompt, rest
            )
            try:
                async for out in stream:
                    ended += out.finished
                    out = _as_original(out, request_id, len(prompt_token_ids), before)
                    delivered.extend(out.token_ids)
                    yield out
                return
            except Exception as exc:
                if not replica_gone(exc):
                    raise unwrap(exc) from None
                if retried or not _resumable(params, delivered):
                    raise ReplicaLost(request_id) from exc
                retried = True
                self.retries[lora_id or ""] = self.retries.get(lora_id or "", 0) + 1
                logger.warning(
                    "request %s: its engine replica was lost (%s) after %d token(s); retrying on another",
                    request_id, type(exc).__name__, len(delivered),
                )  # fmt: skip
            finally:
                if ended < params.n:
                    stream.cancel()
            if ended >= params.n:
                return

    async def score(
        self, prompt_ids: list[int], target_ids: list[int], lora_id: str | None = None
    ) -> list[float]:
        """Teacher-forced log-probabilities of ``target_ids`` (see ``AsyncLLMEngine.score``)."""
        task, version, sha = self._target(lora_id)
        call = self._call("score", task).remote(version, sha, prompt_ids, target_ids)
        return await self._unary(call)

    @staticmethod
    async def _unary(response: Any) -> Any:
        try:
            return await asyncio.wait_for(response, CALL_TIMEOUT_S)
        except asyncio.TimeoutError:
            response.cancel()
            raise TimeoutError(f"no engine replica answered in {CALL_TIMEOUT_S:g} s") from None
        except Exception as exc:
            raise unwrap(exc) from None

    # ---- adapters (the controller's adapter service) --------------------------------

    async def register_lora(self, lora_id: str, loader: Callable[[], Any]) -> None:
        """Nothing to do: replicas register a version when a request first needs it."""

    async def unregister_lora(self, lora_id: str) -> None:
        """Nothing to do: the version leaves the snapshot, and replicas drop it (``reconcile``)."""
        self.evict.pop(lora_id, None)

    async def load_lora(self, lora_id: str) -> int:
        """Make the version resident on a replica holding its task; returns its slot there."""
        self.evict.pop(lora_id, None)
        task, version, sha = self._target(lora_id)
        return await self._unary(self._call("load", task).remote(version, sha))

    async def unload_lora(self, lora_id: str) -> bool:
        """Ask every replica to free the version's slot (it stays servable); applied with their
        next snapshot."""
        self._target(lora_id)
        self.evict[lora_id] = time.time()
        return True


def _resumable(params: SamplingParams, delivered: list[int]) -> bool:
    """Whether a request can go on elsewhere after its replica died, having ``delivered``
    tokens: from the start when nothing was delivered; as a continuation of its one choice
    otherwise (the choices of an ``n`` > 1 request have prefixes of their own, and a scoring
    request's prompt log-probabilities belong to its original prompt)."""
    if params.score_from is not None:
        return False
    return not delivered or params.n == 1


def _as_original(
    out: RequestOutput, request_id: str, prompt_tokens: int, before: int
) -> RequestOutput:
    """An output of a continuation, counted as the original request's."""
    if not before and out.request_id == request_id:
        return out
    return replace(
        out, request_id=request_id, prompt_tokens=prompt_tokens,
        completion_tokens=out.completion_tokens + before,
    )  # fmt: skip


def stats_of(values: Mapping[str, float]) -> EngineStats:
    """EngineStats from summed figures (each field in its own type)."""
    default = EngineStats()
    return EngineStats(**{
        f.name: type(getattr(default, f.name))(values.get(f.name, getattr(default, f.name)))
        for f in dataclasses.fields(EngineStats)
    })  # fmt: skip


@dataclass
class FleetState:
    """The controller's latest report of every engine replica."""

    interval_s: float
    clock: Callable[[], float] = time.time
    reports: dict[str, tuple[EngineReport, float]] = field(default_factory=dict)

    def record(self, report: EngineReport) -> None:
        self.reports[report.replica] = (report, self.clock())

    def live(self) -> list[EngineReport]:
        cutoff = self.clock() - REPORT_TTL_INTERVALS * self.interval_s
        for name in [n for n, (_, at) in self.reports.items() if at < cutoff]:
            del self.reports[name]
        return [r for r, _ in self.reports.values()]

    def view(self) -> FleetView:
        reports = self.live()
        if not reports:
            return FleetView()
        stats: dict[str, float] = {}
        for r in reports:
            for f in dataclasses.fields(EngineStats):
                value = float(getattr(r.stats, f.name))
                if f.name == "max_loras_in_step":
                    stats[f.name] = max(stats.get(f.name, 0.0), value)
                else:
                    stats[f.name] = stats.get(f.name, 0.0) + value
        tiers: dict[str, str] = {}
        for r in reports:
            for lora_id, tier in r.tiers.items():
                if TIER_ORDER.get(tier, 9) < TIER_ORDER.get(tiers.get(lora_id, "disk"), 9):
                    tiers[lora_id] = tier
        info = reports[0].info
        waiting = tuple(sorted({lora_id for r in reports for lora_id in r.waiting}))
        per_replica = {
            r.replica: {"steps": r.stats.steps, "generated_tokens": r.stats.generated_tokens,
                        "num_running": r.stats.num_running, "num_waiting": r.stats.num_waiting, "tasks": len(r.tasks), "cpu_s": r.cpu_s}
            for r in reports
        }  # fmt: skip
        return FleetView(tuple(sorted(r.replica for r in reports)), stats, tiers, info.device, info.dtype,
                         per_replica, waiting)  # fmt: skip
