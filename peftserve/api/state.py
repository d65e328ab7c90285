"""What the routes share: the engine, the model table, the adapters, rollouts, metrics and credentials."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request

if TYPE_CHECKING:
    from peftserve.api.prompts import PromptLimits
    from peftserve.engine.engine import AsyncLLMEngine, LLMEngine
    from peftserve.server.adapters import AdapterService
    from peftserve.server.canary import RequestAccounting
    from peftserve.server.metrics import Metrics
    from peftserve.server.model_table import ModelTable

T = TypeVar("T")


@dataclass
class ServingState:
    engine: AsyncLLMEngine
    models: ModelTable
    metrics: Metrics
    api_keys: tuple[str, ...] = ()
    admin_token: str = ""
    adapters: AdapterService | None = None
    """The registry-backed adapter service; None on a server built without a data directory."""
    canary: RequestAccounting | None = None
    """Canary rollouts: a ``CanaryRuntime`` (controller, metric windows, shadow copies), on a Ray
    ingress replica its request accounting alone; None without a registry."""
    max_request_bytes: int = 1 << 20
    """Largest JSON body a /v1 route reads (413 beyond it)."""
    prompt_limits: PromptLimits | None = None
    """The context, and the prompt-length bound checked before tokenizing."""
    workers: ThreadPoolExecutor | None = None
    """Threads for the CPU work of a request (tokenizing, chat templates); None: inline."""

    async def offload(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a worker thread, so the event loop keeps answering meanwhile."""
        if self.workers is None:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn)

    @property
    def llm(self) -> LLMEngine:
        return self.engine.engine


def get_state(request: Request) -> ServingState:
    return request.app.state.serving


def set_request_id(request: Request, request_id: str) -> None:
    """Name the request (also the engine's request id and the X-Request-Id header)."""
    request.state.request_id = request_id
