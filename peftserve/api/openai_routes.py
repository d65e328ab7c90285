"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

A request's ``model`` is the base model, a task (the canary router picks its version from the
``user`` field, else the ``X-Session-Id`` header, else the request id; ``X-Canary`` counts
from admin callers only) or a pinned ``task@version``. Every answer names what served it:
``X-Peftserve-Version: task@version`` (the base model: its name) and ``X-Peftserve-Arm:
stable|candidate|pinned`` (pinned: the request named the version; the arm label of its metrics).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from peftserve.api import prompts
from peftserve.api.auth import is_admin, require_api_key
from peftserve.api.generation import (
    EngineFailed,
    Generation,
    OutputStream,
    cancel_on_disconnect,
    collect,
    open_stream,
)
from peftserve.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)
from peftserve.api.state import ServingState, get_state, set_request_id
from peftserve.api.streaming import (
    ChatChunker,
    Chunker,
    CompletionChunker,
    SSEResponse,
    StreamInfo,
    chat_logprobs,
    completion_logprobs,
    sse_body,
)
from peftserve.engine.sampling_params import SamplingParams
from peftserve.server.errors import APIError
from peftserve.server.metrics import RequestTracker, failure_outcome, request_arm
from peftserve.server.model_table import Target

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@dataclass
class Job:
    """A validated request, ready for the engine."""

    request_id: str
    model: str
    lora_id: str | None
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    created: int
    engine_id: str = ""
    """The engine's request id: ``request_id``, or a derived one when stable answers for a
    failed candidate (the client still sees ``request_id``)."""

    def __post_init__(self) -> None:
        self.engine_id = self.engine_id or self.request_id

    def stream_info(self) -> StreamInfo:
        wants_logprobs = self.params.logprobs is not None
        return StreamInfo(
            self.request_id, self.model, self.created, self.include_usage, wants_logprobs
        )


@router.get("/models")
async def list_models(state: ServingState = Depends(get_state)) -> dict:
    cards = [ModelCard(**dataclasses.asdict(entry)) for entry in state.models.cards()]
    return ModelList(data=cards).model_dump()


@router.get("/models/{model:path}")
async def retrieve_model(model: str, state: ServingState = Depends(get_state)) -> dict:
    return ModelCard(**dataclasses.asdict(state.models.card(model))).model_dump()


@router.post("/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    request_id = _new_id(request, "cmpl")
    target = _resolve(state, body, request, request_id)
    job = _prepare(state, target, lambda: _completion_job(body, state, request_id, target.lora_id))
    if job.stream:  # the stream records the request when it closes
        return await _stream(request, state, job, target, CompletionChunker)
    generation, served = await _generate(request, state, job, target)
    logprobs = None
    if job.params.logprobs is not None:
        logprobs = completion_logprobs(generation.logprobs or [])
    choice = CompletionChoice(
        text=generation.text, logprobs=logprobs, finish_reason=generation.finish_reason
    )
    response = CompletionResponse(
        id=job.request_id,
        created=job.created,
        model=job.model,
        choices=[choice],
        usage=_usage(generation),
    )
    return JSONResponse(response.model_dump(), headers=served.headers())


@router.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    request_id = _new_id(request, "chatcmpl")
    target = _resolve(state, body, request, request_id)
    job = _prepare(state, target, lambda: _chat_job(body, state, request_id, target.lora_id))
    if job.stream:  # the stream records the request when it closes
        return await _stream(request, state, job, target, ChatChunker)
    generation, served = await _generate(request, state, job, target)
    logprobs = None
    if job.params.logprobs is not None:
        logprobs = chat_logprobs(generation.logprobs or [])
    choice = ChatChoice(
        message=AssistantMessage(content=generation.text),
        logprobs=logprobs,
        finish_reason=generation.finish_reason,
    )
    response = ChatCompletionResponse(
        id=job.request_id,
        created=job.created,
        model=job.model,
        choices=[choice],
        usage=_usage(generation),
    )
    return JSONResponse(response.model_dump(), headers=served.headers())


def _resolve(
    state: ServingState, body: CompletionRequest | ChatCompletionRequest, request: Request, request_id: str
) -> Target:
    """The (task, version) serving this request; 404 for an unknown model (before any metric)."""
    return state.models.resolve(
        body.model, user=body.user, headers=request.headers, request_id=request_id,
        is_admin=is_admin(request),
    )  # fmt: skip


def _prepare(state: ServingState, target: Target, build: Callable[[], Job]) -> Job:
    """Validate the request into a Job; a refusal counts as an error of the target's series."""
    try:
        return build()
    except BaseException as exc:
        state.metrics.track(target.task, target.version, request_arm(target)).finish(failure_outcome(exc))
        _name(exc, target)
        raise


def _new_id(request: Request, prefix: str) -> str:
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    set_request_id(request, request_id)
    return request_id


def _completion_job(
    body: CompletionRequest, state: ServingState, request_id: str, lora_id: str | None
) -> Job:
    prompts.reject_unsupported(body)
    llm = state.llm
    ids = prompts.completion_prompt_ids(llm.tokenizer, body.prompt, _vocab_size(state))
    max_tokens = prompts.context_max_tokens(len(ids), body.max_tokens, llm.max_model_len)
    params = prompts.sampling_params(body, max_tokens, body.logprobs)
    return _job(body, request_id, lora_id, ids, params)


def _chat_job(
    body: ChatCompletionRequest, state: ServingState, request_id: str, lora_id: str | None
) -> Job:
    prompts.reject_unsupported(body)
    logprobs = prompts.chat_logprobs(body)
    llm = state.llm
    ids = prompts.chat_prompt_ids(llm.tokenizer, body.messages)
    requested, tokens_param = prompts.chat_max_tokens(body)
    max_tokens = prompts.context_max_tokens(
        len(ids), requested, llm.max_model_len, "messages", tokens_param
    )
    params = prompts.sampling_params(body, max_tokens, logprobs, tokens_param)
    return _job(body, request_id, lora_id, ids, params)


def _job(
    body: CompletionRequest | ChatCompletionRequest,
    request_id: str,
    lora_id: str | None,
    ids: list[int],
    params: SamplingParams,
) -> Job:
    return Job(
        request_id=request_id,
        model=body.model,
        lora_id=lora_id,
        prompt_ids=ids,
        params=params,
        stream=bool(body.stream),
        include_usage=body.include_usage,
        created=int(time.time()),
    )


def _vocab_size(state: ServingState) -> int:
    return int(getattr(state.llm.model_config, "vocab_size", len(state.llm.tokenizer)))


# ---- running a routed request -------------------------------------------------------------
#
# A request runs on its target. When the target is a rollout's candidate (placed there by the
# router's hash or an admin's X-Canary, not pinned) and the engine fails it (finish reason
# 'error', e.g. non-finite logits) or the attempt raises anything but an API error, stable
# answers instead, transparently: the client sees stable's answer and its version header; the
# failure counts against the candidate and stable's answer is recorded outside the experiment.
# A non-streamed request can fall back at any point; a stream only before its first event:
# the engine's first output carries the first token or the error, and nothing is sent before
# it. A candidate that fails later in a stream ends the stream with an error event (counted).


async def _generate(
    request: Request, state: ServingState, job: Job, target: Target
) -> tuple[Generation, Target]:
    """The whole generation and the target that served it (stable after a failed candidate)."""
    try:
        return await _attempt(request, state, job, target), target
    except Exception as exc:
        fallback = _fallback(state, target, exc)
        if fallback is None:
            _name(exc, target)
            raise
    retry = _retarget(job, fallback)
    try:
        return await _attempt(request, state, retry, fallback, fallback=True), fallback
    except Exception as exc:
        _name(exc, fallback)
        raise


async def _attempt(
    request: Request, state: ServingState, job: Job, target: Target, *, fallback: bool = False
) -> Generation:
    tracker = _track(state, job, target, fallback)

    async def run() -> Generation:
        stream = await open_stream(
            state.engine, job.engine_id, job.prompt_ids, job.params, job.lora_id, tracker
        )
        return await collect(stream, job.engine_id)

    try:
        return await cancel_on_disconnect(request, run())
    except BaseException as exc:
        tracker.finish(failure_outcome(exc))
        raise


async def _stream(
    request: Request, state: ServingState, job: Job, target: Target, chunker: Callable[[StreamInfo], Chunker]
) -> Response:
    stream, served = await cancel_on_disconnect(request, _open(state, job, target))
    info = job.stream_info()
    return SSEResponse(sse_body(stream, chunker(info), info), headers=served.headers(), stream=stream)


async def _open(state: ServingState, job: Job, target: Target) -> tuple[OutputStream, Target]:
    """The started stream and its target; a candidate failing before its first token falls back."""
    try:
        stream = await _open_attempt(state, job, target)
    except Exception as exc:
        fallback = _fallback(state, target, exc)
        if fallback is None:
            _name(exc, target)
            raise
    else:
        first = stream.first
        if first.finish_reason != "error":
            return stream, target
        fallback = _fallback(state, target, EngineFailed(job.engine_id, first.error))
        if fallback is None:
            return stream, target  # the stream sends the error event
        await stream.aclose()  # records the candidate's failure
    try:
        return await _open_attempt(state, _retarget(job, fallback), fallback, fallback=True), fallback
    except Exception as exc:
        _name(exc, fallback)
        raise


async def _open_attempt(
    state: ServingState, job: Job, target: Target, *, fallback: bool = False
) -> OutputStream:
    tracker = _track(state, job, target, fallback)
    try:
        return await open_stream(
            state.engine, job.engine_id, job.prompt_ids, job.params, job.lora_id, tracker
        )
    except BaseException as exc:
        tracker.finish(failure_outcome(exc))
        raise


def _track(state: ServingState, job: Job, target: Target, fallback: bool) -> RequestTracker:
    """The attempt's tracker: Prometheus, plus the canary accounting when rollouts run."""
    hook = None
    if state.canary is not None:
        hook = state.canary.finish_hook(target, job.request_id, job.prompt_ids, job.params, fallback=fallback)
    return state.metrics.track(target.task, target.version, request_arm(target), hook)


def _fallback(state: ServingState, target: Target, exc: BaseException) -> Target | None:
    """Stable's target when ``exc`` is a candidate failure that stable should answer, else None."""
    decision = target.decision
    if decision is None or decision.arm != "candidate" or decision.reason == "pin":
        return None
    if isinstance(exc, APIError) and not isinstance(exc, EngineFailed):
        return None  # refused (400, 429...) or aborted: not the candidate's fault
    fallback = state.models.fallback(target)
    non_finite = isinstance(exc, EngineFailed) and exc.non_finite
    logger.warning(
        "request on %s@%s failed (%s); stable %s answers instead", target.task, target.version,
        "non-finite logits" if non_finite else f"{type(exc).__name__}: {exc}", fallback.version,
    )  # fmt: skip
    if state.canary is not None and not isinstance(exc, EngineFailed):
        state.canary.record_failure(target)  # raised before the engine answered: no tracker saw it
    return fallback


def _retarget(job: Job, target: Target) -> Job:
    """The job again, on ``target``'s adapter, under a fresh engine request id."""
    return replace(job, lora_id=target.lora_id, engine_id=f"{job.request_id}-{target.version}")


def _name(exc: BaseException, target: Target) -> None:
    """An API error answered after routing names the version that tried, like a success."""
    if isinstance(exc, APIError):
        exc.headers = {**target.headers(), **exc.headers}


def _usage(generation: Generation) -> Usage:
    return Usage.of(generation.prompt_tokens, generation.completion_tokens)
