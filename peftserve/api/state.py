"""What the routes share: the engine, the model table and the API keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from peftserve.api.model_table import ModelTable
    from peftserve.engine.engine import AsyncLLMEngine, LLMEngine


@dataclass
class ServingState:
    engine: AsyncLLMEngine
    models: ModelTable
    api_keys: tuple[str, ...] = ()

    @property
    def llm(self) -> LLMEngine:
        return self.engine.engine


def get_state(request: Request) -> ServingState:
    return request.app.state.serving


def set_request_id(request: Request, request_id: str) -> None:
    """Name the request (also the engine's request id and the X-Request-Id header)."""
    request.state.request_id = request_id
