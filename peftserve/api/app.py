"""The FastAPI app: OpenAI routes, /health, errors in OpenAI's shape, engine lifecycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from peftserve import __version__
from peftserve.api import health, openai_routes
from peftserve.api.errors import install_error_handlers
from peftserve.api.middleware import RequestIdMiddleware
from peftserve.api.state import ServingState

if TYPE_CHECKING:
    from peftserve.api.model_table import ModelTable
    from peftserve.config import ServerConfig
    from peftserve.engine.engine import AsyncLLMEngine

logger = logging.getLogger(__name__)


def build_app(engine: AsyncLLMEngine, models: ModelTable, server: ServerConfig) -> FastAPI:
    """The app serving ``engine``; the engine's step loop runs while the app is up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        logger.info("engine started: %s + %d adapters", models.base_name, len(models.adapters))
        try:
            yield
        finally:
            engine.shutdown()
            logger.info("engine stopped")

    app = FastAPI(title="peftserve", version=__version__, lifespan=lifespan)
    app.state.serving = ServingState(engine, models, tuple(server.api_key))
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(openai_routes.router)
    app.include_router(health.router)
    return app
