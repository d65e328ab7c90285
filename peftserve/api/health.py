"""GET /health: liveness plus the engine's counters (steps, mixed-adapter steps, KV use)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from peftserve.api.state import ServingState, get_state

router = APIRouter()


@router.get("/health")
async def health(state: ServingState = Depends(get_state)) -> JSONResponse:
    """200 with status "ok" while the engine's step loop runs, else 503 "engine stopped"."""
    running = state.engine.is_running
    body = {
        "status": "ok" if running else "engine stopped",
        "model": state.models.base_name,
        "adapters": state.models.tasks,
        "engine": stats_dict(state.engine.stats),
    }
    return JSONResponse(body, status_code=200 if running else 503)


def stats_dict(stats: object) -> dict[str, Any]:
    """EngineStats as plain JSON values (a dataclass or any object with public attributes)."""
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        raw = dataclasses.asdict(stats)
    else:
        raw = {k: v for k, v in vars(stats).items() if not k.startswith("_")}
    return {k: v for k, v in raw.items() if isinstance(v, (int, float, str, bool, type(None)))}
