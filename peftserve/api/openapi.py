"""The OpenAPI document (/openapi.json) as the server answers: its error statuses and bodies.

Every error is answered in OpenAI's shape (``ErrorResponse``), with the statuses listed per
route here; request-validation failures are 400s, so FastAPI's default 422 entry (and its
``HTTPValidationError`` schema) is taken out of the document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from peftserve.api.schemas import ErrorResponse

_ERRORS = {
    400: "Invalid request: `error.param` names the field at fault.",
    401: "Missing or wrong bearer token.",
    403: "Admin route: wrong admin token, or a remote client without one configured.",
    404: "Unknown model, adapter, rollout, completion or route.",
    409: "Conflicts with the current state (a version already there, a protected version, an active rollout).",
    413: "The request body is larger than the server accepts.",
    429: "The request queue is full; retry after `Retry-After` seconds.",
    500: "Internal error; the message names the request id to find in the server log.",
    503: "Unavailable: the engine stopped, the request was aborted at shutdown, the data directory "
    "is not writable, or the feature is off on this server.",
    507: "The data directory has no room left for the upload.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A chunk as JSON (`text_completion` or `chat.completion.chunk`), an "
            'error as `{"error": ...}`, or `[DONE]`, the last event.',
        }
    },
}
SSE_200: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events (one schema per event).",
        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
    }
}
INFERENCE_ERRORS = (400, 401, 404, 413, 429, 500, 503)
"""What /v1/completions and /v1/chat/completions answer besides 200."""
ADMIN_ERRORS = (400, 401, 403, 404, 409, 413, 500, 503, 507)
"""What the admin routes answer besides 200/201."""


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries: each status with OpenAI's error body."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _ERRORS[status]}
        if status == 429:
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out


def install_openapi(app: FastAPI) -> None:
    """Serve the document without FastAPI's 422 (the server answers 400 instead)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
