"""Bearer-token check for the inference routes (open when no API key is configured)."""

from __future__ import annotations

import hmac

from fastapi import Request

from peftserve.api.errors import unauthorized
from peftserve.api.state import get_state


async def require_api_key(request: Request) -> None:
    keys = get_state(request).api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not _matches(token.strip(), keys):
        raise unauthorized()


def _matches(token: str, keys: tuple[str, ...]) -> bool:
    # Compare against every key (no early exit) in constant time per key.
    hits = [hmac.compare_digest(token.encode(), key.encode()) for key in keys]
    return any(hits)
