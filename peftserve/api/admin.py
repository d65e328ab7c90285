"""Admin routes under /admin: upload, list, show, delete, load and unload adapters; and
vLLM's runtime adapter API (``vllm_router``): ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter``.

All of them need the admin token (``peftserve.api.auth.require_admin``), checked before a
byte of the body is read. Errors are in OpenAI's shape; registry errors keep their status
(400 invalid, 404 unknown, 409 conflict or protected, 413 too large) and their ``kind`` as
the error ``code``.

vLLM's two routes answer as vLLM does (200 with a ``Success: ...`` text) and go through the
same service as uploads and deletes (``AdapterService.load_path`` and ``unload_name``): a
loaded adapter is validated and stored like an upload, and stays registered across restarts
until it is unloaded. ``lora_name`` is a task (an unload removes every version of it) or
``task@version``; ``lora_path`` is a directory on the server.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.requests import ClientDisconnect

from peftserve.api.auth import require_admin
from peftserve.api.body import JSONRoute
from peftserve.api.schemas import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from peftserve.api.state import get_state
from peftserve.server.adapters import AdapterService
from peftserve.server.errors import APIError, invalid_request, unsupported
from peftserve.server.multipart import MultipartError

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class _AdminJSONRoute(JSONRoute):
    before_body = (require_admin,)  # 401/403 before the body is read


vllm_router = APIRouter(
    prefix="/v1", dependencies=[Depends(require_admin)], route_class=_AdminJSONRoute
)

CLIENT_CLOSED_STATUS = 499


def _service(request: Request) -> AdapterService:
    service = get_state(request).adapters
    if service is None:
        raise APIError(503, "This server has no adapter registry.", "server_error", None, "no_registry")
    return service


@router.get("/adapters")
async def list_adapters(request: Request, task: str | None = None) -> dict[str, Any]:
    """Every registered version (of ``task`` if given), by task, oldest first."""
    return {"object": "list", "data": await _service(request).list(task)}


@router.get("/adapters/{task}")
async def show_task(task: str, request: Request) -> dict[str, Any]:
    """The task's stable version and all its versions."""
    return await _service(request).task(task)


@router.get("/adapters/{task}/{version}")
async def show_adapter(task: str, version: str, request: Request) -> dict[str, Any]:
    return await _service(request).get(task, version)


_UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object",
    "required": ["adapter_config.json", "adapter_model.safetensors"],
    "properties": {
        "adapter_config.json": {"type": "string", "format": "binary"},
        "adapter_model.safetensors": {"type": "string", "format": "binary"},
        "base_fingerprint": {"type": "string", "description": "Refuse unless the server's base model has it."},
    },
}}}}  # fmt: skip
"""The upload's parts, in this order (``peftserve.server.multipart`` reads them as they stream)."""


@router.put(
    "/adapters/{task}/{version}",
    responses={201: {"description": "Stored: a new version."}},
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_adapter(task: str, version: str, request: Request) -> JSONResponse:
    """Store ``task@version`` from a multipart body (adapter_config.json, then
    adapter_model.safetensors; optional field base_fingerprint): 201 if new, 200 if this
    exact content was already registered under that version."""
    service = _service(request)
    try:
        view, created = await service.upload(
            task, version, request.headers.get("content-type"), _content_length(request),
            request.stream(),
        )  # fmt: skip
    except MultipartError as exc:
        raise invalid_request(str(exc), None, "invalid_multipart") from None
    except ClientDisconnect:
        raise APIError(CLIENT_CLOSED_STATUS, "Client closed the request.", "client_closed") from None
    return JSONResponse(view, status_code=201 if created else 200)


@router.delete("/adapters/{task}/{version}")
async def delete_adapter(task: str, version: str, request: Request) -> dict[str, Any]:
    """Delete a version: 409 while it is its task's stable version (or a rollout uses it)."""
    return await _service(request).delete(task, version)


@router.post("/adapters/{task}/{version}/load")
async def load_adapter(task: str, version: str, request: Request) -> dict[str, Any]:
    """Load the version into an adapter slot now (instead of on its first request)."""
    return await _service(request).load(task, version)


@router.post("/adapters/{task}/{version}/unload")
async def unload_adapter(task: str, version: str, request: Request) -> dict[str, Any]:
    """Free its slot; it stays registered and is loaded again on demand."""
    return await _service(request).unload(task, version)


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        raise invalid_request("Content-Length is not a number") from None


_TEXT_200 = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}


@vllm_router.post("/load_lora_adapter", response_class=Response, responses=_TEXT_200)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """vLLM's runtime load: serve the adapter directory ``lora_path`` (on this server) as
    ``lora_name``. The same content again is a success that changes nothing."""
    if body.load_inplace:
        raise unsupported(
            "load_inplace",
            "load_inplace=true (replacing a served adapter's weights; unload it first, or upload "
            "the new weights as a version and roll it out)",
        )
    await _service(request).load_path(body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@vllm_router.post("/unload_lora_adapter", response_class=Response, responses=_TEXT_200)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """vLLM's runtime unload: stop serving ``lora_name`` and remove it from the registry
    (a task: all its versions; 409 while a rollout uses it)."""
    await _service(request).unload_name(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
