"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from peftserve.api import prompts
from peftserve.api.auth import require_api_key
from peftserve.api.generation import Generation, cancel_on_disconnect, collect, open_stream
from peftserve.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
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

    def stream_info(self) -> StreamInfo:
        wants_logprobs = self.params.logprobs is not None
        return StreamInfo(
            self.request_id, self.model, self.created, self.include_usage, wants_logprobs
        )


@router.get("/models")
async def list_models(state: ServingState = Depends(get_state)) -> dict:
    return state.models.cards().model_dump()


@router.get("/models/{model:path}")
async def retrieve_model(model: str, state: ServingState = Depends(get_state)) -> dict:
    return state.models.card(model).model_dump()


@router.post("/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    job = _completion_job(body, state, _new_id(request, "cmpl"))
    if job.stream:
        return await _stream(request, state, job, CompletionChunker(job.stream_info()))
    generation = await _generate(request, state, job)
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
    return JSONResponse(response.model_dump())


@router.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    job = _chat_job(body, state, _new_id(request, "chatcmpl"))
    if job.stream:
        return await _stream(request, state, job, ChatChunker(job.stream_info()))
    generation = await _generate(request, state, job)
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
    return JSONResponse(response.model_dump())


def _new_id(request: Request, prefix: str) -> str:
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    set_request_id(request, request_id)
    return request_id


def _completion_job(body: CompletionRequest, state: ServingState, request_id: str) -> Job:
    lora_id = state.models.resolve(body.model)
    prompts.reject_unsupported(body)
    llm = state.llm
    ids = prompts.completion_prompt_ids(llm.tokenizer, body.prompt, _vocab_size(state))
    max_tokens = prompts.context_max_tokens(len(ids), body.max_tokens, llm.max_model_len)
    params = prompts.sampling_params(body, max_tokens, body.logprobs)
    return _job(body, request_id, lora_id, ids, params)


def _chat_job(body: ChatCompletionRequest, state: ServingState, request_id: str) -> Job:
    lora_id = state.models.resolve(body.model)
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


async def _generate(request: Request, state: ServingState, job: Job) -> Generation:
    async def run() -> Generation:
        stream = await open_stream(
            state.engine, job.request_id, job.prompt_ids, job.params, job.lora_id
        )
        return await collect(stream, job.request_id)

    return await cancel_on_disconnect(request, run())


async def _stream(request: Request, state: ServingState, job: Job, chunker: Chunker) -> Response:
    opening = open_stream(state.engine, job.request_id, job.prompt_ids, job.params, job.lora_id)
    stream = await cancel_on_disconnect(request, opening)
    return SSEResponse(sse_body(stream, chunker, job.stream_info()))


def _usage(generation: Generation) -> Usage:
    return Usage.of(generation.prompt_tokens, generation.completion_tokens)
