"""Admin calls from an ingress replica to the controller (Ray Serve composition).

On Ray the controller alone writes the registry, the stable pointers and the rollouts, so it
serves the routes that read or change them: ``/admin/...`` (adapters, rollouts, the web page's
overview), ``POST /v1/feedback``, the web page and the API docs. Its app is the one-process
app itself (``peftserve.api.app.build_app``), routes, auth and errors included. An ingress
replica answers the inference routes, ``/health`` and ``/metrics`` itself and forwards every
other request to it whole: method, path, query, headers, body and the client's address (the
admin API's loopback rule sees the real client), as an ``HttpCall`` through the controller's
deployment handle; the controller runs it through its app in-process (``answer``) and the
answer goes back as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from fastapi import APIRouter, Request
from starlette.responses import Response

from peftserve.api.state import set_request_id
from peftserve.server.errors import RETRY_AFTER_S, APIError

logger = logging.getLogger(__name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})
REQUEST_ID_HEADER = "x-request-id"
INTERNAL_HOST = "controller"


@dataclass(frozen=True)
class HttpCall:
    """One HTTP request, as the ingress received it."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    client: tuple[str, int] | None


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


async def answer(app: Callable, call: HttpCall) -> HttpAnswer:
    """Run ``call`` through the ASGI ``app`` in this process (the controller's side)."""
    transport = httpx.ASGITransport(app=app, client=call.client or ("127.0.0.1", 0))
    url = call.path + (f"?{call.query}" if call.query else "")
    headers = [(k, v) for k, v in call.headers if k.lower() not in HOP_HEADERS]
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{INTERNAL_HOST}") as client:
        response = await client.request(call.method, url, headers=headers, content=call.body)
    kept = tuple((k, v) for k, v in response.headers.multi_items() if k.lower() not in HOP_HEADERS)
    return HttpAnswer(response.status_code, kept, response.content)


def forward_router(
    send: Callable[[HttpCall], Awaitable[HttpAnswer]],
    max_body_bytes: int,
    after_write: Callable[[], Awaitable[None]] | None = None,
) -> APIRouter:
    """A catch-all router that forwards what no other route answered (the ingress's side).

    Bodies longer than ``max_body_bytes`` get 413 before anything is forwarded. After a write
    that succeeded, ``after_write`` runs (the ingress refreshes its snapshot).
    """
    router = APIRouter()

    @router.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def forward(path: str, request: Request) -> Response:
        body = await _read(request, max_body_bytes)
        client = (request.client.host, request.client.port) if request.client else None
        call = HttpCall(request.method, request.url.path, request.url.query,
                        tuple(request.headers.items()), body, client)  # fmt: skip
        try:
            got = await send(call)
        except APIError:
            raise
        except Exception as exc:
            logger.warning("forwarding %s %s to the controller failed: %s: %s",
                           call.method, call.path, type(exc).__name__, exc)  # fmt: skip
            raise APIError(503, "The rollout controller is not available right now; try again.", "server_error",
                           None, "controller_unavailable", {"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
        if after_write is not None and call.method not in ("GET", "HEAD") and got.status < 400:
            try:
                await after_write()
            except Exception:  # the next poll installs it
                logger.debug(
                    "snapshot refresh after %s %s failed", call.method, call.path, exc_info=True
                )
        return _response(request, got)

    return router


async def _read(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.", "invalid_request_error", None,
                    "request_too_large")  # fmt: skip


def _response(request: Request, got: HttpAnswer) -> Response:
    response = Response(got.body, status_code=got.status)
    del response.headers["content-length"]
    for name, value in got.headers:
        if name.lower() == REQUEST_ID_HEADER:
            set_request_id(request, value)  # one id, the controller's (its log names it)
        else:
            response.headers.append(name, value)
    response.headers["content-length"] = str(len(got.body))
    return response
