"""``peftserve serve --ray``: the three roles as Ray Serve deployments (see ``docs/ray.md``).

- ``Engine`` (``--engine-replicas``, one per GPU; ``--engine-num-cpus`` each on CPU): the async
  engine and its adapter tiers (``EngineHost``), multiplexed by *task*: Ray Serve routes a task's
  requests to the replicas holding it, loads it elsewhere when they are busy
  (``--engine-max-ongoing-requests``), and drops the least recently used task beyond
  ``--max-tasks-per-replica``.
- ``Controller`` (exactly one replica): the registry, stable pointers, rollout store, audit
  history, judge and tick loop on the SQLite under ``--data-dir``, behind the data directory's
  lease (its writes are fenced by epoch). It runs the one-process app on a ``RemoteEngine`` and
  answers the admin calls ingresses forward, hands out snapshots, takes sample batches and
  engine reports, and serves adapter files by sha256. Probes go through the engine handle.
- ``Ingress`` (``--ingress-replicas``, the HTTP entry): the inference routes, auth, /health and
  /metrics, routing with its snapshot (``ControllerLink``), accounting into a sample buffer.

``application(settings)`` builds the Serve application, ``app_builder(args)`` is the import
path of ``serve deploy deploy/ray/peftserve.yaml`` (and KubeRay's RayService), and
``run_ray(settings)`` starts (or joins) Ray and serves until interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from peftserve.registry import db
from peftserve.server.canary import RequestAccounting, RolloutCollector
from peftserve.server.engine_host import (
    AdapterFileCache,
    EngineHost,
    TaskAdapters,
    default_cache_dir,
)
from peftserve.server.fleet import EngineReport, FleetState, ModelInfo, ModelView, RemoteEngine
from peftserve.server.forward import HttpAnswer, HttpCall, answer, forward_router
from peftserve.server.link import Batch, ControllerLink
from peftserve.server.samples import apply
from peftserve.server.settings import ServeSettings, config_values, flag_specs, settings_from_values
from peftserve.server.snapshot import Snapshot, SnapshotSource
from peftserve.server.startup import (
    configure_logging,
    load_engine,
    model_table,
    open_adapter_service,
    open_canary,
    register_startup_adapters,
    startup_adapters,
)

logger = logging.getLogger(__name__)

APP_NAME = "peftserve"
ENGINE, CONTROLLER, INGRESS = "Engine", "Controller", "Ingress"
START_TIMEOUT_S = 600.0
"""How long an ingress or controller replica waits for the engine and controller to answer."""
MULTIPART_SLACK = 64 * 1024
LATE_COMPLETION_INTERVALS = 3
"""Feedback on a completion not pushed yet waits this many snapshot intervals (plus a second)."""
INGRESS_MAX_ONGOING = 1024
FORWARD_TIMEOUT_S = 120.0
"""How long an admin call waits for the controller (a restarting one included) before a 503."""
INGRESS_HEADER = b"x-peftserve-ingress"


def _replica_name() -> str:
    return serve.get_replica_context().replica_id.unique_id


def _limit_threads() -> None:
    """Torch's CPU threads: as many as the CPUs Ray reserved for this replica (Ray leaves them
    at the machine's core count, so N replicas of one CPU would fight over every core)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, math.floor(cpus)))
        logger.info(
            "torch uses %d CPU thread(s) (the replica's %g Ray CPU)", torch.get_num_threads(), cpus
        )


# ---- Engine -------------------------------------------------------------------------------


class EngineDeployment:
    """One engine replica (see the module docstring)."""

    async def __init__(self, settings: ServeSettings) -> None:
        configure_logging(settings.server.log_level)
        from peftserve.engine.engine import AsyncLLMEngine

        _limit_threads()
        llm = await asyncio.to_thread(load_engine, settings.engine)
        engine = AsyncLLMEngine(llm)
        engine.start()
        context = serve.get_replica_context()
        self._controller = serve.get_deployment_handle(CONTROLLER, context.app_name)
        cache = AdapterFileCache(settings.ray.adapter_cache_dir or default_cache_dir(), self._fetch)
        self.host = EngineHost(engine, cache, _replica_name(), settings.engine.lora.max_lora_rank)
        self._interval = settings.ray.snapshot_interval_s
        host = self.host

        async def load_task(task: str) -> TaskAdapters:  # a function: Ray Serve keeps its LRU on it
            return host.task(task)

        self._task = serve.multiplexed(
            max_num_models_per_replica=settings.ray.max_tasks_per_replica
        )(load_task)
        self._poll = asyncio.get_running_loop().create_task(
            self._report_loop(), name="engine-report"
        )
        logger.info("engine replica %s ready on %s", self.host.name, llm.device)

    async def _holder(self) -> TaskAdapters | None:
        task = serve.get_multiplexed_model_id()
        return await self._task(task) if task else None

    async def generate(
        self, version: str, sha: str, request_id: str, prompt_ids: list[int], params: Any
    ):
        holder = await self._holder()
        async for out in self.host.generate(holder, version, sha, request_id, prompt_ids, params):
            yield out

    async def score(
        self, version: str, sha: str, prompt_ids: list[int], target_ids: list[int]
    ) -> list[float]:
        return await self.host.score(await self._holder(), version, sha, prompt_ids, target_ids)

    async def load(self, version: str, sha: str) -> int:
        holder = await self._holder()
        if holder is None:
            raise ValueError("load needs a task (the multiplexed model id)")
        return await self.host.load(holder, version, sha)

    def info(self) -> ModelInfo:
        return self.host.info()

    async def _fetch(self, sha: str) -> Mapping[str, bytes]:
        return await self._controller.adapter_files.remote(sha)

    async def _report_loop(self) -> None:
        while True:
            try:
                snapshot = await self._controller.engine_report.remote(self.host.report())
                await self.host.reconcile(snapshot)
            except Exception as exc:  # the controller is away: serve on, report later
                logger.debug("engine report failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self._interval)

    def check_health(self) -> None:
        if not self.host.engine.is_running:
            raise RuntimeError("the engine's step loop stopped")

    async def __del__(self) -> None:
        self._poll.cancel()
        self.host.engine.shutdown()


# ---- Controller ---------------------------------------------------------------------------


class ControllerDeployment:
    """The one rollout controller (see the module docstring)."""

    async def __init__(self, settings: ServeSettings, engine: DeploymentHandle) -> None:
        configure_logging(settings.server.log_level)
        world = serve.get_replica_context().world_size
        if world != 1:
            raise ValueError(
                f"the Controller deployment must have exactly one replica, not {world}"
            )
        self.data_dir = settings.server.data_dir
        holder = f"{_replica_name()} on {socket.gethostname()} (pid {os.getpid()})"
        self.epoch = await asyncio.to_thread(db.acquire_lease, self.data_dir, holder)
        info = await asyncio.wait_for(engine.info.remote(), START_TIMEOUT_S)
        view = await asyncio.to_thread(
            ModelView, settings.engine.model.model, info, settings.engine
        )
        table = model_table(settings)
        table.max_model_len = info.max_model_len
        self.fleet = FleetState(settings.ray.snapshot_interval_s)
        self.remote = RemoteEngine(engine, view, self._snapshot)
        self._metrics_text, self._metrics_at = "", 0.0
        self.snapshots = SnapshotSource(
            table,
            self.epoch,
            self.fleet.view,
            lambda: self.remote.evict,
            metrics=self._rollout_metrics,
        )
        self.service = open_adapter_service(settings, self.remote, table)
        register_startup_adapters(self.service, startup_adapters(settings))
        self.service.restore()
        self.runtime = open_canary(settings, self.remote, self.service)
        self.runtime.late_completion_s = (
            LATE_COMPLETION_INTERVALS * settings.ray.snapshot_interval_s + 1.0
        )
        from peftserve.api.app import build_app

        self.app = build_app(self.remote, table, settings.server, self.service, self.runtime)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self._applied: dict[str, int] = {}
        logger.info(
            "rollout controller ready (lease epoch %d, data in %s)", self.epoch, self.data_dir
        )

    def _snapshot(self) -> Snapshot:
        return self.snapshots.take()

    def _rollout_metrics(self) -> str:
        """The rollout collector's series as text, rendered at most once per snapshot interval."""
        runtime = getattr(self, "runtime", None)  # None while the controller is being built
        now = time.monotonic()
        if runtime is not None and now - self._metrics_at >= self.fleet.interval_s:
            registry = CollectorRegistry()
            registry.register(RolloutCollector(runtime))
            self._metrics_text, self._metrics_at = generate_latest(registry).decode(), now
        return self._metrics_text

    async def http(self, call: HttpCall) -> HttpAnswer:
        """An admin call an ingress forwarded, answered by the app."""
        return await answer(self.app, call)

    def sync(self, source: str, batches: list[Batch]) -> Snapshot:
        """An ingress's sample batches in; the latest snapshot out."""
        last = self._applied.get(source, 0)
        for number, calls in batches:
            if number > last:
                apply(self.runtime.windows, calls)
                last = number
        self._applied[source] = last
        return self._snapshot()

    def engine_report(self, report: EngineReport) -> Snapshot:
        """An engine replica's figures in; the latest snapshot out."""
        self.fleet.record(report)
        return self._snapshot()

    async def adapter_files(self, sha: str) -> dict[str, bytes]:
        """The files of the adapter content ``sha`` (engine replicas fetch and cache them)."""

        def read() -> dict[str, bytes]:
            return {
                name: path.read_bytes()
                for name, path in self.service.registry.files_of(sha).items()
            }

        return await asyncio.to_thread(read)

    def check_health(self) -> None:
        epoch = db.lease_epoch(self.data_dir)
        if epoch != self.epoch:
            raise RuntimeError(
                f"the data directory's lease moved to epoch {epoch}; this controller held {self.epoch}"
            )

    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)
        db.release_fence(self.data_dir)


# ---- Ingress ------------------------------------------------------------------------------


@serve.ingress()
class IngressDeployment:
    """One ingress replica (see the module docstring)."""

    async def __init__(
        self, settings: ServeSettings, engine: DeploymentHandle, controller: DeploymentHandle
    ) -> None:
        configure_logging(settings.server.log_level)
        self._controller = controller
        info = await asyncio.wait_for(engine.info.remote(), START_TIMEOUT_S)
        view = await asyncio.to_thread(
            ModelView, settings.engine.model.model, info, settings.engine
        )
        table = model_table(settings)
        table.max_model_len = info.max_model_len
        self.name = _replica_name()
        self.link = ControllerLink(self._sync, table, self.name, settings.ray.snapshot_interval_s)
        await self.link.first(START_TIMEOUT_S)
        self.remote = RemoteEngine(engine, view, self.link.current)
        accounting = RequestAccounting(table, self.remote, settings.canary, self.link.samples)
        limit = settings.server.max_adapter_bytes + MULTIPART_SLACK
        forward = forward_router(self._forward, limit, after_write=self.link.refresh)
        from peftserve.api.app import build_app

        self.asgi = build_app(
            self.remote, table, settings.server, canary=accounting, forward=forward
        )
        self.asgi.state.serving.metrics.add_collector(RetryCollector(self.remote, self.link))
        self.asgi.state.serving.metrics.add_collector(SnapshotCollector(self.link))
        self.asgi.add_middleware(ReplicaHeader, name=self.name)
        self.link.start()
        logger.info("ingress replica %s ready", self.name)

    def __serve_build_asgi_app__(self) -> Any:
        return self.asgi

    async def _sync(self, source: str, batches: list[Batch]) -> Snapshot:
        return await self._controller.sync.remote(source, batches)

    async def _forward(self, call: HttpCall) -> HttpAnswer:
        response = self._controller.http.remote(call)
        try:
            return await asyncio.wait_for(response, FORWARD_TIMEOUT_S)
        except asyncio.TimeoutError:
            response.cancel()
            raise TimeoutError(
                f"the controller did not answer in {FORWARD_TIMEOUT_S:g} s"
            ) from None

    async def __del__(self) -> None:
        await self.link.stop()


class ReplicaHeader:
    """Pure-ASGI middleware: ``X-Peftserve-Ingress: <replica>`` on every answer of this replica."""

    def __init__(self, app: Any, name: str) -> None:
        self.app = app
        self.name = name.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (INGRESS_HEADER, self.name)]
            await send(message)

        await self.app(scope, receive, named)


class SnapshotCollector:
    """Prometheus: the controller's rollout series, as the latest snapshot carries them."""

    def __init__(self, link: ControllerLink) -> None:
        self._link = link

    def collect(self) -> Any:
        snapshot = self._link.snapshot
        if snapshot is not None and snapshot.rollout_metrics:
            yield from text_string_to_metric_families(snapshot.rollout_metrics)


class RetryCollector:
    """Prometheus: requests retried after their engine replica died; sample batches dropped."""

    def __init__(self, remote: RemoteEngine, link: ControllerLink) -> None:
        self._remote = remote
        self._link = link

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        retries = CounterMetricFamily(
            "peftserve_engine_retries", "Requests retried on another engine replica after theirs was lost.",
            labels=["model"],
        )  # fmt: skip
        for lora_id, count in sorted(self._remote.retries.items()):
            retries.add_metric([lora_id or "base"], float(count))
        yield retries
        yield CounterMetricFamily("peftserve_sample_batches_dropped", "Sample batches dropped while the "
                                  "controller was away too long.", value=float(self._link.dropped_batches))  # fmt: skip
        yield GaugeMetricFamily("peftserve_samples_pending", "Samples waiting to be pushed to the controller.",
                                value=float(len(self._link.samples)))  # fmt: skip


# ---- assembly -----------------------------------------------------------------------------


def engine_gpus(settings: ServeSettings) -> float:
    """GPUs per engine replica: the setting, or (-1) one when the cluster has GPUs."""
    if settings.ray.engine_num_gpus >= 0:
        return settings.ray.engine_num_gpus
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def application(
    settings: ServeSettings, options: Mapping[str, Mapping[str, Any]] | None = None
) -> Application:
    """The Serve application: Ingress -> (Engine, Controller -> Engine).

    ``options`` overrides the deployments' options by name (``Engine``, ``Controller``,
    ``Ingress``), like the ``deployments:`` section of a Serve config file.
    """
    r, extra = settings.ray, options or {}
    defaults = {
        ENGINE: dict(num_replicas=r.engine_replicas, max_ongoing_requests=r.engine_max_ongoing_requests,
                     ray_actor_options={"num_cpus": r.engine_num_cpus, "num_gpus": engine_gpus(settings)}),
        CONTROLLER: dict(num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING,
                         ray_actor_options={"num_cpus": 0}),
        INGRESS: dict(num_replicas=r.ingress_replicas, max_ongoing_requests=INGRESS_MAX_ONGOING,
                      ray_actor_options={"num_cpus": 0}),
    }  # fmt: skip

    def deployment(cls: type, name: str) -> Any:
        return serve.deployment(cls, name=name).options(**{**defaults[name], **extra.get(name, {})})

    engine = deployment(EngineDeployment, ENGINE).bind(settings)
    controller = deployment(ControllerDeployment, CONTROLLER).bind(settings, engine)
    return deployment(IngressDeployment, INGRESS).bind(settings, engine, controller)


def app_builder(args: Mapping[str, Any]) -> Application:
    """``import_path`` of a Serve config: ``args`` are config fields (``engine_replicas: 2``), over
    the ``PEFTSERVE_*`` variables of the cluster's environment, over the defaults."""
    specs = flag_specs()
    known = {s.field for s in specs}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(
            f"unknown peftserve setting(s) in the Serve config's args: {', '.join(unknown)}"
        )
    import argparse

    values = {**config_values(argparse.Namespace(), specs, os.environ), **dict(args)}
    return application(settings_from_values(values, specs))


def run_ray(settings: ServeSettings) -> None:
    """Start (or join) Ray, serve the application on ``--host``/``--port``, block until interrupted."""
    import ray

    server, r = settings.server, settings.ray
    configure_logging(server.log_level)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if r.ray_address:
        ray.init(address=r.ray_address, logging_level=logging.WARNING)
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(r.engine_replicas * r.engine_num_cpus))
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": server.host, "port": server.port})
        serve.run(application(settings), name=APP_NAME, route_prefix="/")
        logger.info("serving on http://%s:%d (Ray Serve: %d engine, %d ingress replica(s), one controller)",
                    server.host, server.port, r.engine_replicas, r.ingress_replicas)  # fmt: skip
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        serve.shutdown()
        ray.shutdown()
