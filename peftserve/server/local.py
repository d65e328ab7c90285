"""``peftserve serve`` in one process: the ingress (routes, auth, router), the engine host and
the controller (registry, rollouts, judge) composed in one FastAPI app served by uvicorn.

Settings -> engine -> registry and adapters -> rollouts -> FastAPI app -> uvicorn (whose
lifespan starts the engine, then restores and runs the rollout controller).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from peftserve.server.startup import (
    GRACEFUL_SHUTDOWN_S,
    check_model_dir,
    configure_logging,
    load_engine,
    model_table,
    open_adapter_service,
    open_canary,
    register_startup_adapters,
    startup_adapters,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from peftserve.server.settings import ServeSettings

logger = logging.getLogger(__name__)


def build_serving_app(settings: ServeSettings) -> FastAPI:
    """Load the engine, open the registry, serve its adapters; return the app (the engine
    starts with the app)."""
    check_model_dir(settings.engine.model.model)
    table = model_table(settings)
    startup = startup_adapters(settings)
    from peftserve.api.app import build_app
    from peftserve.engine.engine import AsyncLLMEngine

    engine = load_engine(settings.engine)
    table.max_model_len = engine.max_model_len
    async_engine = AsyncLLMEngine(engine)
    service = open_adapter_service(settings, async_engine, table)
    try:
        register_startup_adapters(service, startup)
        service.restore()
        canary = open_canary(settings, async_engine, service)
    except BaseException:
        service.close()
        raise
    return build_app(async_engine, table, settings.server, service, canary)


def run_server(settings: ServeSettings) -> None:
    """Start serving and block until interrupted."""
    import uvicorn

    server = settings.server
    configure_logging(server.log_level)
    app = build_serving_app(settings)
    logger.info("starting server on http://%s:%d (OpenAI API under /v1)", server.host, server.port)
    uvicorn.run(
        app,
        host=server.host,
        port=server.port,
        log_config=None,  # uvicorn's loggers go through ours (one format)
        log_level=server.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
