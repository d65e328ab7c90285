"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Routes raise ``APIError``; the handlers installed by ``install_error_handlers`` turn it,
FastAPI's request-validation errors and Starlette's HTTP errors into that shape. Anything
else becomes a generic 500 in ``RequestIdMiddleware`` (``peftserve.api.middleware``): the
traceback goes to the server log, never to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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
    return APIError(status, str(exc), error_type, None, kind)


def internal_error(request_id: str) -> APIError:
    message = f"The server had an error while processing the request (request id {request_id})."
    return APIError(500, message, "server_error", None, "internal_error")


def validation_error(errors: Sequence[Any]) -> APIError:
    """The first pydantic/FastAPI error as a 400 whose ``param`` names the field."""
    if not errors:
        return invalid_request("Invalid request body.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return invalid_request("The request body is not valid JSON.", None, "invalid_json")
    param = _param_from_loc(first.get("loc", ()))
    if param is None:
        return invalid_request("The request body must be a JSON object.", None)
    return invalid_request(f"{param}: {first.get('msg', 'invalid value')}", param)


def _param_from_loc(loc: Sequence[Any]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        elif _is_union_tag(part):
            continue
        else:
            name += f".{part}" if name else str(part)
    return name or None


def _is_union_tag(part: str) -> bool:
    # pydantic names union members in loc ('prompt', 'str'); they are no field names.
    return part in ("str", "int", "float", "bool") or part.startswith(("list[", "function-"))


def install_error_handlers(app: FastAPI) -> None:
    from peftserve.registry.errors import RegistryError

    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RegistryError, _registry_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _registry_error_handler(request: Request, exc: Exception) -> JSONResponse:
    return registry_error(exc).response()


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc.errors()).response()


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = "not_found" if exc.status_code == 404 else None
    error = APIError(exc.status_code, str(exc.detail), "invalid_request_error", None, code)
    error.headers = dict(exc.headers or {})
    return error.response()
