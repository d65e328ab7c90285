"""Rollout routes: /admin/rollouts (start, read, steer) and POST /v1/feedback.

Admin routes (the admin token, as every /admin route)::

    POST /admin/rollouts                       start: a RolloutSpec as JSON (+ eval_set, reason) -> 201
    GET  /admin/rollouts                       the latest rollout of every task that had one
    GET  /admin/rollouts/{task}                where it stands: state, weight, step, versions, the
                                               next decision and its progress (samples vs needed,
                                               time left), last judgment, plan, arms
    GET  /admin/rollouts/{task}/history        its events, oldest first (?limit=, ?kind=)
    GET  /admin/rollouts/{task}/timeline       the same as time series, for the web page's charts
    POST /admin/rollouts/{task}/pause|resume|promote|rollback|retry   (body: {"reason": ...})

The start body is ``RolloutSpec.to_dict()``'s shape: ``task`` and ``candidate`` are required;
``stable`` defaults to the task's current stable version; ``steps``, ``step_interval_s``,
``shadow_percent``, ``targeting``, ``analysis``, ``policy`` and ``probe_temperature`` to the
spec's defaults. ``eval_set`` (known-answer probes) is a list of ``{"prompt", "answer"}`` or the
same as a JSONL string; ``tolerances`` and ``mdes`` (``{"metric": number}``) replace those of the
named metrics of the analysis. Without an eval set and without ``analysis.metrics``, the
default metrics are judged minus ``probe_accuracy`` (nothing would feed it: the rollout could
only hold, then pause), and minus ``latency`` on a server that runs no probes. Invalid specs answer 400 with the reason, a second active rollout or a transition that
does not fit the state 409, a task without a rollout 404; the error ``code`` is
``invalid_rollout``, ``rollout_conflict`` or ``rollout_not_found``.

Feedback (the inference API key, as every /v1 route): ``POST /v1/feedback`` with
``{"id": completion_id, "score": number in [0, 1] | true | false}`` -> 200; an unknown or
expired completion id -> 404 (code ``completion_not_found``); a bad score -> 400 (param
``score``). A second score for the same completion replaces the first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from peftserve.api.auth import require_admin, require_api_key
from peftserve.api.body import decode_json, decode_json_async, read_body
from peftserve.api.openapi import errors
from peftserve.api.schemas import FeedbackRequest, FeedbackResponse
from peftserve.api.state import get_state
from peftserve.canary.spec import RolloutSpec, RolloutSpecError, default_metrics
from peftserve.server import dashboard
from peftserve.server.canary import CanaryRuntime
from peftserve.server.errors import APIError, invalid_request

logger = logging.getLogger(__name__)

admin_router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
feedback_router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

ACTIONS = ("pause", "resume", "promote", "rollback", "retry")
START_FIELDS = ("eval_set", "reason", "tolerances", "mdes")
"""Fields of the start body beside the spec's."""
_ERROR_CODES = {400: "invalid_rollout", 404: "rollout_not_found", 409: "rollout_conflict"}


def _runtime(request: Request) -> CanaryRuntime:
    runtime = get_state(request).canary
    if runtime is None:
        raise APIError(503, "This server runs no rollouts (it has no adapter registry).", "server_error",
                       None, "no_rollouts")  # fmt: skip
    return runtime


@contextmanager
def _rollout_errors() -> Iterator[None]:
    """RolloutSpecError (400), RolloutConflictError (409), RolloutNotFoundError (404) -> APIError."""
    try:
        yield
    except RolloutSpecError as exc:
        raise APIError(exc.status, exc.reason, "invalid_request_error", None,
                       _ERROR_CODES.get(exc.status, "rollout_error")) from None  # fmt: skip


async def _json_object(
    request: Request, what: str, *, optional: bool = False, limit: int | None = None
) -> dict[str, Any]:
    """The body as a strict JSON object (``peftserve.api.body``), read within ``limit`` bytes."""
    raw = await read_body(request, limit) if limit is not None else await request.body()
    if optional and not raw.strip():
        return {}
    body = await decode_json_async(raw)
    if not isinstance(body, dict):
        raise invalid_request(f"The request body must be a JSON object ({what}).")
    return body


# ---- start --------------------------------------------------------------------------------


def parse_eval_set(value: Any) -> list[Any] | None:
    """``eval_set`` as a list: given as a list, or as JSONL text (one object per line).

    Each item must be ``{"prompt": non-empty str, "answer": str}``; an error names it as
    ``line N`` (JSONL, counting every line of the text) or ``item N`` (a list), from 1.
    """
    if value is None:
        return None
    if isinstance(value, list):
        numbered = [(f"item {n}", item) for n, item in enumerate(value, start=1)]
    elif isinstance(value, str):
        numbered = []
        for n, line in enumerate(value.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((f"line {n}", decode_json(line.encode(), f"eval_set line {n}")))
            except APIError as exc:  # not JSON, or JSON with a lone surrogate or deep nesting
                raise RolloutSpecError(exc.message) from None
    else:
        raise RolloutSpecError(f"eval_set must be a list of {{\"prompt\", \"answer\"}} objects or JSONL text, "
                               f"not {type(value).__name__}")  # fmt: skip
    for where, item in numbered:
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) \
                or not isinstance(item.get("answer"), str) or not item["prompt"]:  # fmt: skip
            raise RolloutSpecError(f"eval_set {where} must be an object with a non-empty string \"prompt\" "
                                   f"and a string \"answer\", not {item!r:.200}")  # fmt: skip
    return [item for _, item in numbered]


def _default_analysis(data: dict[str, Any], has_eval_set: bool, probes: bool) -> None:
    """Without explicit metrics, the default metrics minus those nothing would feed:
    probe_accuracy without an eval set, latency on a server without probes."""
    analysis = data.get("analysis", {})
    if not isinstance(analysis, dict) or "metrics" in analysis:
        return
    drop = ({"probe_accuracy"} if not has_eval_set else set()) | ({"latency"} if not probes else set())
    if drop:
        data["analysis"] = {**analysis, "metrics": [m.to_dict() for m in default_metrics() if m.name not in drop]}


def _per_metric(body: dict[str, Any], field: str) -> dict[str, float]:
    value = body.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise RolloutSpecError(f'{field} must be an object {{"metric": number}}, not {value!r:.100}')
    return value


def parse_start(body: dict[str, Any], runtime: CanaryRuntime) -> tuple[RolloutSpec, list[Any] | None, str | None]:
    """The spec, eval set and reason of a start request; RolloutSpecError (400) when invalid."""
    data = {k: v for k, v in body.items() if k not in START_FIELDS}
    eval_set = parse_eval_set(body.get("eval_set"))
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise RolloutSpecError(f"reason must be a string, not {type(reason).__name__}")
    task = data.get("task")
    if isinstance(task, str) and data.get("stable") is None:
        stable = runtime.table.stable(task)
        if stable is None:
            raise RolloutSpecError(f"unknown task {task!r} (it has no served version)")
        data["stable"] = stable
    _default_analysis(data, eval_set is not None, runtime.controller.hooks.probe is not None)
    spec = RolloutSpec.from_dict(data)
    tolerances, mdes = _per_metric(body, "tolerances"), _per_metric(body, "mdes")
    if tolerances or mdes:
        spec = replace(spec, analysis=spec.analysis.with_overrides(tolerances, mdes))
    return spec, eval_set, reason


@admin_router.post("/rollouts", status_code=201)
async def start_rollout(request: Request) -> JSONResponse:
    """Start a rollout: 201 with its status; 400 invalid, 409 when the task already has one."""
    runtime = _runtime(request)
    body = await _json_object(request, "a rollout spec")
    with _rollout_errors():
        spec, eval_set, reason = parse_start(body, runtime)
        await runtime.controller.start(spec, eval_set, reason=reason)
        status = await to_thread.run_sync(runtime.controller.status, spec.task)
    return JSONResponse(status, status_code=201)


# ---- read ---------------------------------------------------------------------------------


@admin_router.get("/rollouts")
async def list_rollouts(request: Request) -> dict[str, Any]:
    """The latest rollout of every served task that had one (active or finished), by task."""
    runtime = _runtime(request)
    return {"object": "list", "data": await to_thread.run_sync(dashboard.all_rollout_statuses, runtime)}


@admin_router.get("/rollouts/{task}")
async def show_rollout(task: str, request: Request) -> dict[str, Any]:
    """Where the task's latest rollout stands; 404 if it never had one."""
    runtime = _runtime(request)
    with _rollout_errors():
        return await to_thread.run_sync(runtime.controller.status, task)


@admin_router.get("/rollouts/{task}/history")
async def rollout_history(
    task: str, request: Request, limit: int = Query(100, ge=1, le=10_000), kind: list[str] | None = Query(None)
) -> dict[str, Any]:
    """The task's latest ``limit`` events (of ``kind`` if given: state, judgment, decision, ...), oldest first."""
    runtime = _runtime(request)

    def read() -> list[dict[str, Any]]:
        return runtime.controller.history(task, limit, kinds=kind)

    with _rollout_errors():
        events = await to_thread.run_sync(read)
    return {"object": "list", "task": task, "data": events}


@admin_router.get("/rollouts/{task}/timeline")
async def rollout_timeline(
    task: str, request: Request, limit: int = Query(dashboard.TIMELINE_EVENTS, ge=10, le=10_000)
) -> dict[str, Any]:
    """The task's latest rollout as time series for charts: weight and state, score, each metric's
    numbers per judgment; its latest events; when the next judgment and the step's end are due."""
    runtime = _runtime(request)
    with _rollout_errors():
        return await to_thread.run_sync(dashboard.rollout_timeline, runtime, task, limit)


# ---- steer --------------------------------------------------------------------------------


@admin_router.post("/rollouts/{task}/{action}")
async def steer_rollout(task: str, action: str, request: Request) -> dict[str, Any]:
    """pause, resume, promote, rollback (the active rollout) or retry (the rolled-back one)."""
    if action not in ACTIONS:
        raise APIError(404, f"unknown rollout action {action!r}; one of {', '.join(ACTIONS)}",
                       "invalid_request_error", None, "not_found")  # fmt: skip
    runtime = _runtime(request)
    body = await _json_object(request, '{"reason": ...}', optional=True)
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise invalid_request("reason must be a string", "reason")
    controller = runtime.controller
    method = {"pause": controller.pause, "resume": controller.resume, "promote": controller.promote_now,
              "rollback": controller.rollback_now, "retry": controller.retry}[action]  # fmt: skip
    with _rollout_errors():
        await method(task, reason)
        return await to_thread.run_sync(controller.status, task)


# ---- feedback -----------------------------------------------------------------------------


def _score(value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return float(value)
    raise invalid_request(f"score must be true, false or a number in [0, 1], not {value!r:.50}", "score")


@feedback_router.post(
    "/feedback",
    response_model=FeedbackResponse,
    responses=errors(400, 401, 404, 413, 500, 503),
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": FeedbackRequest.model_json_schema()}}}},
)  # fmt: skip
async def feedback(request: Request) -> dict[str, Any]:
    """A user's score of a completion: attributed to the version that answered it."""
    runtime = _runtime(request)
    limit = get_state(request).max_request_bytes
    body = await _json_object(request, '{"id": ..., "score": ...}', limit=limit)
    unknown = sorted(set(body) - {"id", "score"})
    if unknown:
        raise invalid_request(f"unknown field(s): {', '.join(unknown)}; feedback takes id and score", unknown[0])
    completion_id = body.get("id")
    if not isinstance(completion_id, str) or not completion_id:
        raise invalid_request("id must be the id of a completion (a non-empty string)", "id")
    if "score" not in body:
        raise invalid_request("score is required: true, false or a number in [0, 1]", "score")
    score = _score(body["score"])
    if not await runtime.record_feedback(completion_id, score):
        ttl = runtime.windows.feedback_ttl_s
        raise APIError(404, f"unknown or expired completion id {completion_id!r:.100} (feedback is accepted for "
                            f"{ttl:g} s after the answer)", "invalid_request_error", "id",
                       "completion_not_found")  # fmt: skip
    return {"object": "feedback", "id": completion_id, "score": score}
