"""Request bodies: read within a size limit, decoded as strict JSON, before any route sees them.

``read_body`` counts bytes as they arrive and answers 413 as soon as the declared
(Content-Length) or received size passes the limit, so an oversized body is never buffered.
``decode_json`` accepts what RFC 8259 calls interoperable JSON and nothing else: UTF-8 text,
no ``NaN``/``Infinity``, no lone UTF-16 surrogates (``"\\ud800"``), at most ``MAX_JSON_DEPTH``
levels of nesting; each refusal is a 400 in OpenAI's shape whose ``param`` names the field.
``JSONRoute`` applies both to a FastAPI route with a body model; routes that read the body
themselves call ``read_body`` and ``decode_json_async``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from anyio import to_thread
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from peftserve.api.state import get_state
from peftserve.server.errors import APIError, ClientDisconnected, invalid_request

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a request body may have (the OpenAI bodies need 5)."""
BYTES_PER_TOKEN = 64
"""Request-body bytes allowed per token of context by default: a token is rarely more than
16 bytes of text, and JSON escaping (``\\u00e9``) at most triples it."""
BODY_SLACK_BYTES = 1 << 20
"""Bytes allowed on top of ``BYTES_PER_TOKEN * max_model_len`` (other fields, many messages)."""
OFFLOAD_BYTES = 64 * 1024
"""Bodies larger than this are decoded on a worker thread, not on the event loop."""

BODY = "The request body"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def default_body_limit(max_model_len: int) -> int:
    """The request-body limit when ``--max-request-bytes`` is 0: sized from the context."""
    return BYTES_PER_TOKEN * max_model_len + BODY_SLACK_BYTES


def body_too_large(limit: int) -> APIError:
    message = (
        f"The request body is larger than this server accepts ({limit} bytes; "
        "--max-request-bytes / PEFTSERVE_MAX_REQUEST_BYTES sets it)."
    )
    return APIError(413, message, "invalid_request_error", None, "request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body; 413 once the declared or received size passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected() from None
    return b"".join(chunks)


async def decode_json_async(raw: bytes) -> Any:
    """``decode_json``; large bodies on a worker thread, so the event loop keeps answering."""
    if len(raw) > OFFLOAD_BYTES:
        return await to_thread.run_sync(decode_json, raw)
    return decode_json(raw)


def decode_json(raw: bytes, what: str = BODY) -> Any:
    """Strict JSON: 400 (``invalid_json``) for anything RFC 8259 does not call interoperable."""
    if not raw.strip():
        raise _invalid(f"{what} is empty; send a JSON object.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _invalid(f"{what} is not valid UTF-8 (byte {e.start}).") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise _too_deep(what, None) from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer of over 4300 digits
        raise _invalid(f"{what} is not valid JSON: {e}.") from None
    if _SURROGATE_ESCAPE.search(text) or text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        _check_tree(data, what)
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _invalid(message: str, param: str | None = None) -> APIError:
    return invalid_request(message, param, "invalid_json")


def _too_deep(what: str, param: str | None) -> APIError:
    return _invalid(f"{what} nests arrays and objects deeper than {MAX_JSON_DEPTH} levels.", param)


def _check_tree(data: Any, what: str) -> None:
    """400 for nesting deeper than MAX_JSON_DEPTH or a string holding a lone surrogate."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path, what)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise _too_deep(what, _top_field(path))
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else key
                _check_text(key, child, what)
                stack.append((item, child, depth + 1))
        else:
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        param = path.encode("ascii", "backslashreplace").decode() or None
        where = f"{what}: {param}" if param and what != BODY else param or what
        raise _invalid(
            f"{where}: the string holds a lone UTF-16 surrogate "
            "(such as \\ud800), which is not Unicode text.",
            param,
        ) from None


def _top_field(path: str) -> str | None:
    name = re.split(r"[.\[]", path, maxsplit=1)[0]
    return name.encode("ascii", "backslashreplace").decode() or None


def _check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        shown = f"{content_type!r:.60}" if content_type else "none"
        raise invalid_request(
            f"Send the request body as JSON with the header 'Content-Type: application/json' "
            f"(got {shown}).",
            None,
            "invalid_content_type",
        )


class _DecodedRequest(Request):
    """A request whose body was read and decoded already (what FastAPI's handler reads)."""

    def __init__(self, request: Request, raw: bytes, data: Any) -> None:
        super().__init__(request.scope, request.receive)
        self._body = raw
        self._data = data

    async def json(self) -> Any:
        return self._data


class JSONRoute(APIRoute):
    """A route whose JSON body is read within the server's limit and strictly decoded first.

    FastAPI reads a body before it runs the route's dependencies; ``before_body`` (a
    subclass's credential check) runs first instead, so nobody unauthorized gets a byte read.
    """

    before_body: tuple[Callable[[Request], Awaitable[None]], ...] = ()

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:  # GET routes and the like: no body to read
            return handler

        async def strict_handler(request: Request) -> Response:
            for check in self.before_body:
                await check(request)
            _check_content_type(request)
            raw = await read_body(request, get_state(request).max_request_bytes)
            data = await decode_json_async(raw)
            return await handler(_DecodedRequest(request, raw, data))

        return strict_handler
