"""Bearer tokens: API keys on the inference routes, the admin token on /admin.

Inference routes are open when no API key is configured; when keys are, the admin token is
accepted there too (the admin holds every right). Admin routes need the admin token when one
is configured (401 without an Authorization header, 403 with a wrong token); without one they
answer loopback clients only (403 to anyone else). ``is_admin`` applies the same rule without
raising: the canary router honours ``X-Canary`` only from callers it calls admin. Behind a reverse proxy
on the same host every request looks local unless the proxy sets X-Forwarded-For (uvicorn
trusts it from 127.0.0.1): configure a token there.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from peftserve.api.state import get_state
from peftserve.server.errors import admin_forbidden, admin_unauthorized, unauthorized


async def require_api_key(request: Request) -> None:
    state = get_state(request)
    keys = state.api_keys
    if not keys:
        return
    token = _bearer(request)
    accepted = (*keys, state.admin_token) if state.admin_token else keys
    if token is None or not _matches(token, accepted):
        raise unauthorized()


def is_admin(request: Request) -> bool:
    """Whether the caller passes ``require_admin``: the right admin token, or (without one) loopback."""
    token = get_state(request).admin_token
    if not token:
        return is_loopback(request.client.host if request.client else None)
    given = _bearer(request)
    return given is not None and _matches(given, (token,))


async def require_admin(request: Request) -> None:
    token = get_state(request).admin_token
    if not token:
        if not is_loopback(request.client.host if request.client else None):
            raise admin_forbidden(
                "The admin API answers only local clients when the server has no admin token; "
                "start it with --admin-token (or PEFTSERVE_ADMIN_TOKEN) to allow remote admin."
            )
        return
    given = _bearer(request)
    if given is None:
        raise admin_unauthorized()
    if not _matches(given, (token,)):
        raise admin_forbidden("The admin token is not correct.")


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _matches(token: str, keys: tuple[str, ...]) -> bool:
    # Compare against every key (no early exit) in constant time per key.
    hits = [hmac.compare_digest(token.encode(), key.encode()) for key in keys]
    return any(hits)
