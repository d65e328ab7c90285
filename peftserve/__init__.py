"""peftserve: one base LLM, many LoRA adapters, adapter-level canary rollouts.

``peftserve.Client``, ``peftserve.AsyncClient`` and ``peftserve.PeftserveError`` (from
``peftserve.client``) are imported on first use, so ``import peftserve`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_CLIENT_NAMES = ("Client", "AsyncClient", "PeftserveError")
__all__ = ["AsyncClient", "Client", "PeftserveError", "__version__"]

if TYPE_CHECKING:
    from peftserve.client import AsyncClient, Client, PeftserveError


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from peftserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'peftserve' has no attribute {name!r}")
