"""Errors in OpenAI's shape for every answer of the app.

Routes and services raise ``APIError`` (``peftserve.server.errors``); the handlers installed
by ``install_error_handlers`` turn it, FastAPI's request-validation errors and Starlette's
HTTP errors into that shape. Anything else becomes a generic 500 in ``RequestIdMiddleware``
(``peftserve.api.middleware``): the traceback goes to the server log, never to the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftserve.server.errors import APIError, invalid_request, registry_error


def error_response(error: APIError) -> JSONResponse:
    """``error`` as the response the client gets."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


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
    return error_response(exc)


async def _registry_error_handler(request: Request, exc: Exception) -> JSONResponse:
    return error_response(registry_error(exc))


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc.errors()))


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = "not_found" if exc.status_code == 404 else None
    error = APIError(exc.status_code, str(exc.detail), "invalid_request_error", None, code)
    error.headers = dict(exc.headers or {})
    return error_response(error)
