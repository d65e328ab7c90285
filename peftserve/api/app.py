"""The FastAPI app: OpenAI routes, /admin (adapters, rollouts), /metrics, /health, the web page
(/ui) and API docs, errors in OpenAI's shape, engine and rollout-controller lifecycle.

One app for every composition: ``peftserve serve`` serves all of it in one process; on Ray the
controller runs it whole (behind its deployment handle) and each ingress replica runs it with
the inference routes, /health and /metrics only, forwarding the rest to the controller
(``forward``, see ``peftserve.server.forward``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI

from peftserve import __version__
from peftserve.api import admin, health, metrics, openai_routes, rollouts, ui
from peftserve.api.body import default_body_limit
from peftserve.api.errors import install_error_handlers
from peftserve.api.middleware import RequestIdMiddleware
from peftserve.api.openapi import ADMIN_ERRORS, errors, install_openapi
from peftserve.api.prompts import PromptLimits
from peftserve.api.state import ServingState
from peftserve.server.canary import CanaryRuntime, RolloutCollector
from peftserve.server.metrics import Metrics, VLLMCollector

if TYPE_CHECKING:
    from peftserve.config import ServerConfig
    from peftserve.engine.engine import AsyncLLMEngine
    from peftserve.server.adapters import AdapterService
    from peftserve.server.canary import RequestAccounting
    from peftserve.server.model_table import ModelTable

logger = logging.getLogger(__name__)

REQUEST_WORKERS = 4
"""Threads for the CPU work of requests (tokenizing, chat templates), off the event loop."""


def build_app(
    engine: AsyncLLMEngine,
    models: ModelTable,
    server: ServerConfig,
    adapters: AdapterService | None = None,
    canary: RequestAccounting | None = None,
    *,
    forward: APIRouter | None = None,
) -> FastAPI:
    """The app serving ``engine``; the engine's step loop runs while the app is up.

    ``adapters`` (the registry-backed service) enables /admin; ``canary`` the rollouts
    (/admin/rollouts, /v1/feedback): its controller restores the stored rollouts once the
    engine runs and judges them in the background. Both are closed with the app. With
    ``forward`` (a Ray ingress replica, whose ``canary`` only accounts for its requests), the
    inference routes, /health and /metrics are served here and every other path by ``forward``.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        logger.info("engine started: %s + %d tasks", models.base_name, len(models.tasks))
        # What exists now (model, tokenizer, libraries) lives as long as the server: the
        # collector need not scan it. Without this a full collection, set off by the garbage of
        # large requests, walks every object of torch and transformers while holding the GIL
        # (a second on a loaded CPU), and every other request waits. (Freezing is O(1); it is
        # undone when the server stops, so a stopped server's objects can be collected.)
        gc.freeze()
        try:
            if canary is not None:
                await canary.start()
            yield
        finally:
            if canary is not None:
                await canary.stop()
            workers.shutdown(wait=False, cancel_futures=True)
            engine.shutdown()
            if canary is not None:
                canary.close()
            if adapters is not None:
                adapters.close()
            gc.unfreeze()
            logger.info("engine stopped")

    # /docs and /redoc are ui's routes: their assets are vendored, never from a CDN. A Ray
    # ingress forwards /openapi.json too: the controller's document lists every route.
    app = FastAPI(
        title="peftserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
        openapi_url=None if forward is not None else "/openapi.json",
    )  # fmt: skip
    workers = ThreadPoolExecutor(REQUEST_WORKERS, thread_name_prefix="peftserve-request")
    llm = engine.engine
    app_metrics = Metrics(engine)
    app_metrics.add_collector(VLLMCollector(engine, models))
    engine.on_adapter_load = app_metrics.observe_adapter_load
    if adapters is not None:
        adapters.on_delete.append(app_metrics.forget)
    if canary is not None:
        canary.request_metrics = app_metrics
    if isinstance(canary, CanaryRuntime):
        app_metrics.add_collector(RolloutCollector(canary))
    app.state.serving = ServingState(
        engine=engine,
        models=models,
        metrics=app_metrics,
        api_keys=tuple(server.api_key),
        admin_token=server.admin_token,
        adapters=adapters,
        canary=canary,
        max_request_bytes=server.max_request_bytes or default_body_limit(llm.max_model_len),
        prompt_limits=PromptLimits.of(llm.tokenizer, llm.max_model_len),
        workers=workers,
    )
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(openai_routes.router)
    app.include_router(metrics.router)
    app.include_router(health.router)
    if forward is not None:
        app.include_router(forward)
        return app
    app.include_router(admin.router, responses=errors(*ADMIN_ERRORS))
    app.include_router(admin.vllm_router, responses=errors(*ADMIN_ERRORS))
    app.include_router(rollouts.admin_router, responses=errors(*ADMIN_ERRORS))
    app.include_router(rollouts.feedback_router)
    app.include_router(ui.admin_router, responses=errors(*ADMIN_ERRORS))
    app.include_router(ui.router)
    ui.mount_page(app)
    return app
