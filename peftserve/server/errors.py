"""Errors the services raise, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Services and routes raise ``APIError`` (an HTTP status with an OpenAI error body); the api
layer's handlers (``peftserve.api.errors``) answer it as-is. Anything else becomes a generic
500 in ``RequestIdMiddleware``: the traceback goes to the server log, never to the client.
"""

from __future__ import annotations

from typing import Any

RETRY_AFTER_S = 1
"""Retry-After (seconds) sent with 429 when the engine's queue is full."""


class APIError(Exception):
    """An error answered to the client as-is (status, OpenAI error body, extra headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unsupported(param: str, what: str) -> APIError:
    return invalid_request(f"{what} is not supported", param, "unsupported_parameter")


def model_not_found(model: str) -> APIError:
    message = f"The model `{model}` does not exist. GET /v1/models lists the served models."
    return APIError(404, message, "invalid_request_error", "model", "model_not_found")


def queue_full() -> APIError:
    return APIError(
        429,
        "The server is at capacity (request queue full); retry shortly.",
        "rate_limit_exceeded",
        None,
        "queue_full",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


def unauthorized() -> APIError:
    message = "Missing or incorrect API key: send it as 'Authorization: Bearer <key>'."
    return APIError(401, message, "invalid_request_error", None, "invalid_api_key")


def admin_unauthorized() -> APIError:
    message = "This admin route needs the admin token: send it as 'Authorization: Bearer <token>'."
    return APIError(401, message, "invalid_request_error", None, "missing_admin_token",
                    {"WWW-Authenticate": "Bearer"})  # fmt: skip


def admin_forbidden(message: str) -> APIError:
    return APIError(403, message, "invalid_request_error", None, "forbidden")


def registry_error(exc: Exception) -> APIError:
    """A ``RegistryError`` (it carries ``status`` and ``kind``) in OpenAI's shape."""
    status = int(getattr(exc, "status", 500))
    kind = getattr(exc, "kind", "registry_error")
    error_type = "server_error" if status >= 500 else "invalid_request_error"
    return APIError(status, str(exc), error_type, getattr(exc, "param", None), kind)


def internal_error(request_id: str) -> APIError:
    message = f"The server had an error while processing the request (request id {request_id})."
    return APIError(500, message, "server_error", None, "internal_error")


CLIENT_CLOSED_STATUS = 499


class ClientDisconnected(APIError):
    """The client went away before its answer was ready (the request was aborted)."""

    def __init__(self) -> None:
        super().__init__(CLIENT_CLOSED_STATUS, "Client closed the request.", "client_closed")
