"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

A request's ``model`` is the base model, a task (the canary router picks its version from the
``user`` field, else the ``X-Session-Id`` header, else the request id; ``X-Canary`` counts
from admin callers only) or a pinned ``task@version``. Every answer names what served it:
``X-Peftserve-Version: task@version`` (the base model: its name) and ``X-Peftserve-Arm:
stable|candidate|pinned`` (pinned: the request named the version; the arm label of its metrics).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from peftserve.api import prompts
from peftserve.api.auth import is_admin, require_api_key
from peftserve.api.body import JSONRoute
from peftserve.api.generation import (
    EngineFailed,
    Generation,
    OutputStream,
    cancel_on_disconnect,
    collect,
    gather_or_cancel,
    open_stream,
)
from peftserve.api.openapi import INFERENCE_ERRORS, SSE_200, errors
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
from peftserve.server.completion_ids import new_completion_id
from peftserve.server.errors import APIError, invalid_request, queue_full
from peftserve.server.metrics import RequestTracker, failure_outcome, request_arm
from peftserve.server.model_table import Target

logger = logging.getLogger(__name__)


class _InferenceRoute(JSONRoute):
    before_body = (require_api_key,)  # 401 before the body is read


router = APIRouter(
    prefix="/v1", dependencies=[Depends(require_api_key)], route_class=_InferenceRoute
)


@dataclass
class Job:
    """A validated request, ready for the engine: one engine request per prompt, each with
    ``params[i].n`` choices."""

    request_id: str
    model: str
    lora_id: str | None
    prompts: list[list[int]]
    params: list[SamplingParams]
    """One per prompt (``max_tokens`` may differ: what each prompt leaves of the context)."""
    stream: bool
    include_usage: bool
    created: int
    engine_id: str = ""
    """The engine's request id: ``request_id``, or a derived one when stable answers for a
    failed candidate (the client still sees ``request_id``); ``-<i>`` follows for prompt ``i``
    of a request with several."""
    returned: int = 1
    """Choices returned per prompt (``n``; ``best_of`` generates ``params[i].n`` of them)."""
    user_logprobs: bool = True
    """False when logprobs were computed only to rank ``best_of`` choices."""
    echo: list[str] | None = None
    """Completions ``echo``: each prompt's text."""
    prompt_only: bool = False
    """``echo`` with ``max_tokens: 0``: one token is generated (the prompt's logprobs come from
    its step) and not returned."""
    continuous_usage: bool = False

    def __post_init__(self) -> None:
        self.engine_id = self.engine_id or self.request_id

    def engine_ids(self) -> list[str]:
        if len(self.prompts) == 1:
            return [self.engine_id]
        return [f"{self.engine_id}-{i}" for i in range(len(self.prompts))]

    @property
    def wants_logprobs(self) -> bool:
        return self.params[0].logprobs is not None and self.user_logprobs

    def stream_info(self) -> StreamInfo:
        return StreamInfo(
            self.request_id, self.model, self.created, self.include_usage, self.wants_logprobs,
            n=self.returned, echo=self.echo, prompt_only=self.prompt_only,
            continuous_usage=self.continuous_usage,
        )  # fmt: skip


@router.get("/models", response_model=ModelList, responses=errors(401, 500))
async def list_models(state: ServingState = Depends(get_state)) -> dict:
    cards = [ModelCard(**dataclasses.asdict(entry)) for entry in state.models.cards()]
    return ModelList(data=cards).model_dump()


@router.get("/models/{model:path}", response_model=ModelCard, responses=errors(401, 404, 500))
async def retrieve_model(model: str, state: ServingState = Depends(get_state)) -> dict:
    return ModelCard(**dataclasses.asdict(state.models.card(model))).model_dump()


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**SSE_200, **errors(*INFERENCE_ERRORS)},
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    request_id = _new_id(request, "cmpl")
    target = _resolve(state, body, request, request_id)
    job = await _prepare(
        state, target, lambda: _completion_job(body, state, request_id, target.lora_id)
    )
    if job.stream:  # the stream records the request when it closes
        return await _stream(request, state, job, target, CompletionChunker)
    answers, served = await _generate(request, state, job, target)
    choices = []
    for p, generations in enumerate(answers):
        for i, generation in enumerate(_returned(job, generations)):
            choices.append(_completion_choice(job, p, p * job.returned + i, generation))
    response = CompletionResponse(
        id=job.request_id,
        created=job.created,
        model=job.model,
        choices=choices,
        usage=_usage(job, answers),
    )
    return JSONResponse(response.model_dump(), headers=served.headers())


def _completion_choice(job: Job, prompt: int, index: int, generation: Generation) -> CompletionChoice:
    text, items = generation.text, list(generation.logprobs or [])
    if job.prompt_only:
        text, items = "", []
    if job.echo is not None:
        text = job.echo[prompt] + text
        items = list(generation.prompt_logprobs or []) + items
    logprobs = completion_logprobs(items) if job.wants_logprobs else None
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=generation.finish_reason)


def _returned(job: Job, generations: list[Generation]) -> list[Generation]:
    """The ``n`` choices to return of a prompt's generated ones: with ``best_of``, those of
    highest log-probability per token (OpenAI's rule), best first."""
    if len(generations) == job.returned:
        return generations
    return sorted(generations, key=lambda g: g.mean_logprob, reverse=True)[: job.returned]


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**SSE_200, **errors(*INFERENCE_ERRORS)},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    request_id = _new_id(request, "chatcmpl")
    target = _resolve(state, body, request, request_id)
    job = await _prepare(state, target, lambda: _chat_job(body, state, request_id, target.lora_id))
    if job.stream:  # the stream records the request when it closes
        return await _stream(request, state, job, target, ChatChunker)
    [generations], served = await _generate(request, state, job, target)
    choices = [
        ChatChoice(
            index=generation.index,
            message=AssistantMessage(content=generation.text),
            logprobs=chat_logprobs(generation.logprobs or []) if job.wants_logprobs else None,
            finish_reason=generation.finish_reason,
        )
        for generation in generations
    ]
    response = ChatCompletionResponse(
        id=job.request_id,
        created=job.created,
        model=job.model,
        choices=choices,
        usage=_usage(job, [generations]),
    )
    return JSONResponse(response.model_dump(), headers=served.headers())


def _resolve(
    state: ServingState, body: CompletionRequest | ChatCompletionRequest, request: Request, request_id: str
) -> Target:
    """The (task, version) serving this request; 404 for an unknown model (before any metric)."""
    return state.models.resolve(
        body.model, user=body.user, headers=request.headers, request_id=request_id,
        is_admin=is_admin(request), metadata=body.metadata,
    )  # fmt: skip


async def _prepare(state: ServingState, target: Target, build: Callable[[], Job]) -> Job:
    """Validate the request into a Job; a refusal counts as an error of the target's series.

    A full queue answers 429 before any work; the rest (tokenizing, the chat template) runs on
    a worker thread, so a large prompt never holds up the event loop.
    """
    try:
        _admit(state)
        return await state.offload(build)
    except BaseException as exc:
        state.metrics.track(target.task, target.version, request_arm(target)).finish(failure_outcome(exc))
        _name(exc, target)
        raise


def _admit(state: ServingState) -> None:
    """429 at once when the engine's waiting queue is full (the engine checks again on submit)."""
    llm = state.llm
    if llm.num_waiting >= llm.config.scheduler.max_waiting:
        raise queue_full()


def _new_id(request: Request, prefix: str) -> str:
    request_id = new_completion_id(prefix)
    set_request_id(request, request_id)
    return request_id


def _completion_job(
    body: CompletionRequest, state: ServingState, request_id: str, lora_id: str | None
) -> Job:
    prompts.reject_unsupported(body)
    llm = state.llm
    prompt_ids = prompts.completion_prompts(
        llm.tokenizer, body.prompt, _vocab_size(state), state.prompt_limits, llm.config.scheduler.max_waiting
    )
    n = _choices(state, body.n, "n")
    best_of = n if body.best_of is None else _choices(state, body.best_of, "best_of")
    if best_of < n:
        raise invalid_request(f"best_of ({best_of}) must be at least n ({n}).", "best_of")
    prompt_only = bool(body.echo) and body.max_tokens == 0
    requested = 1 if prompt_only else body.max_tokens
    ranked = best_of > n
    logprobs = 0 if ranked and body.logprobs is None else body.logprobs
    extra: dict = {"n": best_of}
    if body.echo and body.logprobs is not None:
        extra["prompt_logprobs"] = body.logprobs
    several = prompts.is_prompt_list(body.prompt)
    params = []
    for i, ids in enumerate(prompt_ids):
        param = f"prompt[{i}]" if several else "prompt"
        max_tokens = prompts.context_max_tokens(len(ids), requested, llm.max_model_len, param)
        params.append(prompts.sampling_params(body, max_tokens, logprobs, **extra))
    job = _job(body, request_id, lora_id, prompt_ids, params)
    job.returned, job.user_logprobs, job.prompt_only = n, body.logprobs is not None, prompt_only
    if body.echo:
        job.echo = prompts.prompt_texts(llm.tokenizer, body.prompt, prompt_ids)
    return job


def _choices(state: ServingState, value: int | None, param: str) -> int:
    """``n`` or ``best_of`` checked against the seats a request may hold (``max_num_seqs``)."""
    seats = state.llm.config.scheduler.max_num_seqs
    if value is None:
        return 1
    if not 1 <= value <= seats:
        raise invalid_request(f"{param} must be in 1..{seats} (the server's max_num_seqs), got {value}.", param)
    return value


def _chat_job(
    body: ChatCompletionRequest, state: ServingState, request_id: str, lora_id: str | None
) -> Job:
    prompts.reject_unsupported(body)
    logprobs = prompts.chat_logprobs(body)
    llm = state.llm
    ids = prompts.chat_prompt_ids(llm.tokenizer, body.messages, state.prompt_limits)
    requested, tokens_param = prompts.chat_max_tokens(body)
    max_tokens = prompts.context_max_tokens(
        len(ids), requested, llm.max_model_len, "messages", tokens_param
    )
    n = _choices(state, body.n, "n")
    params = prompts.sampling_params(body, max_tokens, logprobs, tokens_param, n=n)
    job = _job(body, request_id, lora_id, [ids], [params])
    job.returned = n
    return job


def _job(
    body: CompletionRequest | ChatCompletionRequest,
    request_id: str,
    lora_id: str | None,
    prompt_ids: list[list[int]],
    params: list[SamplingParams],
) -> Job:
    return Job(
        request_id=request_id,
        model=body.model,
        lora_id=lora_id,
        prompts=prompt_ids,
        params=params,
        stream=bool(body.stream),
        include_usage=body.include_usage,
        created=int(time.time()),
        continuous_usage=body.continuous_usage,
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
) -> tuple[list[list[Generation]], Target]:
    """The whole generation (per prompt, its choices) and the target that served it (stable
    after a failed candidate)."""
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
) -> list[list[Generation]]:
    """Every prompt of the job at once; one failing cancels the others."""
    engine_ids = job.engine_ids()

    async def run(i: int) -> list[Generation]:
        tracker = _track(state, job, target, fallback, i)
        try:
            stream = await open_stream(
                state.engine, engine_ids[i], job.prompts[i], job.params[i], job.lora_id, tracker
            )
            return await collect(stream, engine_ids[i], job.params[i].n)
        except BaseException as exc:
            tracker.finish(failure_outcome(exc))
            raise

    return await cancel_on_disconnect(request, gather_or_cancel(*(run(i) for i in range(len(job.prompts)))))


async def _stream(
    request: Request, state: ServingState, job: Job, target: Target, chunker: Callable[[StreamInfo], Chunker]
) -> Response:
    streams, served = await cancel_on_disconnect(request, _open(state, job, target))
    info = job.stream_info()
    return SSEResponse(sse_body(streams, chunker(info), info), headers=served.headers(), streams=streams)


async def _open(state: ServingState, job: Job, target: Target) -> tuple[list[OutputStream], Target]:
    """The started streams and their target; a candidate failing before its first token falls back."""
    try:
        streams = await _open_all(state, job, target)
    except Exception as exc:
        fallback = _fallback(state, target, exc)
        if fallback is None:
            _name(exc, target)
            raise
    else:
        failed = next((s.first for s in streams if s.first.finish_reason == "error"), None)
        if failed is None:
            return streams, target
        fallback = _fallback(state, target, EngineFailed(job.engine_id, failed.error))
        if fallback is None:
            return streams, target  # the stream sends the error event
        for stream in streams:
            await stream.aclose()  # records the candidate's failure
    try:
        return await _open_all(state, _retarget(job, fallback), fallback, fallback=True), fallback
    except Exception as exc:
        _name(exc, fallback)
        raise


async def _open_all(
    state: ServingState, job: Job, target: Target, *, fallback: bool = False
) -> list[OutputStream]:
    """A started stream per prompt; if one cannot start, those that did are closed."""
    opened = await asyncio.gather(
        *(_open_attempt(state, job, target, i, fallback=fallback) for i in range(len(job.prompts))),
        return_exceptions=True,
    )
    streams = [item for item in opened if isinstance(item, OutputStream)]
    if len(streams) < len(opened):
        for stream in streams:
            await stream.aclose()
        raise next(item for item in opened if isinstance(item, BaseException))
    return streams


async def _open_attempt(
    state: ServingState, job: Job, target: Target, i: int, *, fallback: bool = False
) -> OutputStream:
    tracker = _track(state, job, target, fallback, i)
    try:
        return await open_stream(
            state.engine, job.engine_ids()[i], job.prompts[i], job.params[i], job.lora_id, tracker
        )
    except BaseException as exc:
        tracker.finish(failure_outcome(exc))
        raise


def _track(state: ServingState, job: Job, target: Target, fallback: bool, i: int = 0) -> RequestTracker:
    """The tracker of prompt ``i`` of the attempt (each prompt is a request of the metrics):
    Prometheus, plus the canary accounting when rollouts run."""
    hook = None
    if state.canary is not None:
        hook = state.canary.finish_hook(target, job.request_id, job.prompts[i], job.params[i], fallback=fallback)
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


def _usage(job: Job, answers: list[list[Generation]]) -> Usage:
    """Every prompt once, every generated choice (those ``best_of`` did not return too)."""
    prompt_tokens = sum(generations[0].prompt_tokens for generations in answers)
    completion = 0 if job.prompt_only else sum(g.completion_tokens for gs in answers for g in gs)
    return Usage.of(prompt_tokens, completion)
