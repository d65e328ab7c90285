"""Pure-ASGI middleware: X-Request-Id on every response, and the last-resort 500.

Routes may rename the request (``cmpl-...``) through ``request.state.request_id``; the
header is written when the response starts, so it carries the final name. An exception no
handler took is logged with its traceback and answered with a generic 500 that names the
request id, never the exception.
"""

from __future__ import annotations

import logging
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from peftserve.api.errors import error_response
from peftserve.server.errors import internal_error

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = f"req-{uuid.uuid4().hex}"
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, state["request_id"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s failed", state["request_id"])
            if not started:
                response = error_response(internal_error(state["request_id"]))
                await response(scope, receive, send_with_id)
