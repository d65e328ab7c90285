"""Python client for a peftserve server: adapters (the admin API) and completions (the OpenAI API).

    from peftserve import Client

    with Client("http://127.0.0.1:8000") as client:
        client.upload("./reverse-v2", name="reverse", version="v2")
        print(client.completion("reverse@v2", "hello", max_tokens=16).text)
        for chunk in client.completion_stream("reverse", "hello", max_tokens=16):
            print(chunk.text, end="")
        client.start_rollout("reverse", "v2", steps=[5, 25, 50], step_interval_s=300)
        print(client.rollout("reverse").summary)

``AsyncClient`` has the same methods as coroutines (streams as async iterators). Settings
left out come from the environment: ``PEFTSERVE_SERVER`` (default http://127.0.0.1:8000),
``PEFTSERVE_ADMIN_TOKEN`` (sent to /admin) and ``PEFTSERVE_API_KEY`` (sent to /v1). A failed
call raises ``PeftserveError`` with the server's status and OpenAI-shaped error fields
(status 0 when the server could not be reached).
"""

from __future__ import annotations

import builtins
import json
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
UPLOAD_FILES = (CONFIG_NAME, WEIGHTS_NAME)
"""Uploaded in this order (the server needs the config first)."""
CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)

Progress = Callable[[int], None]
"""Called with the number of bytes just sent."""


class PeftserveError(Exception):
    """A call the server refused or failed (``status`` 0: the server could not be reached)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


# ---- typed results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """One registered adapter version."""

    task: str
    version: str
    sha256: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    base_fingerprint: str
    created_at: float
    stable: bool
    """Whether this is the stable version of its task (it serves plain ``"model": task``)."""
    status: str
    """gpu, cpu or disk (where the adapter is now); unservable (another base model); deleted."""

    @property
    def ref(self) -> str:
        """``task@version``: the model name that pins this version."""
        return f"{self.task}@{self.version}"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Adapter:
        return cls(
            task=data["task"],
            version=data["version"],
            sha256=data["sha256"],
            rank=int(data["rank"]),
            alpha=float(data["alpha"]),
            target_modules=tuple(data.get("target_modules", ())),
            size_bytes=int(data["size_bytes"]),
            base_fingerprint=data.get("base_fingerprint", ""),
            created_at=float(data.get("created_at", 0.0)),
            stable=bool(data.get("stable", False)),
            status=data.get("status", ""),
        )


@dataclass(frozen=True)
class Task:
    """A task: its stable version and every registered version."""

    task: str
    stable: str | None
    versions: list[Adapter]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Task:
        versions = [Adapter.from_json(v) for v in data.get("versions", [])]
        return cls(task=data["task"], stable=data.get("stable"), versions=versions)


@dataclass(frozen=True)
class Model:
    """An entry of /v1/models: the base model, a task or a ``task@version``."""

    id: str
    created: int
    owned_by: str
    root: str | None
    parent: str | None
    max_model_len: int | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Model:
        return cls(
            id=data["id"], created=int(data.get("created", 0)), owned_by=data.get("owned_by", ""),
            root=data.get("root"), parent=data.get("parent"), max_model_len=data.get("max_model_len"),
        )  # fmt: skip


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Usage | None:
        if not data:
            return None
        return cls(data["prompt_tokens"], data["completion_tokens"], data["total_tokens"])


@dataclass(frozen=True)
class Completion:
    id: str
    model: str
    created: int
    text: str
    finish_reason: str | None
    usage: Usage | None
    logprobs: dict[str, Any] | None = None


@dataclass(frozen=True)
class CompletionChunk:
    """One streamed piece of a completion; the last one (with stream usage) may have no text."""

    id: str
    model: str
    created: int
    text: str
    finish_reason: str | None
    usage: Usage | None = None


@dataclass(frozen=True)
class ChatCompletion:
    id: str
    model: str
    created: int
    content: str
    finish_reason: str | None
    usage: Usage | None
    role: str = "assistant"


@dataclass(frozen=True)
class ChatCompletionChunk:
    id: str
    model: str
    created: int
    content: str
    finish_reason: str | None
    role: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class RolloutJudgment:
    """The latest judgment of a rollout: candidate against stable, with its evidence."""

    at: float
    result: str
    """pass, marginal, fail, nodata (inconclusive) or error (the evaluator failed)."""
    score: float | None
    """0-100, None without data."""
    reason: str
    deciding_metric: str | None
    metrics: tuple[dict[str, Any], ...]
    """Per metric: classification, samples per arm, values, estimate, interval, tolerance, detail."""

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RolloutJudgment | None:
        if not data:
            return None
        return cls(
            at=float(data.get("at", 0.0)), result=data["result"], score=data.get("score"),
            reason=data.get("reason", ""), deciding_metric=data.get("deciding_metric"),
            metrics=tuple(data.get("metrics", ())),
        )  # fmt: skip


@dataclass(frozen=True)
class Rollout:
    """Where a task's latest rollout stands (``GET /admin/rollouts/{task}``)."""

    rollout_id: int
    task: str
    stable: str
    candidate: str
    state: str
    """shadow, ramping, paused, promoted or rolled_back."""
    active: bool
    weight: float
    """Candidate share of the task's traffic, in percent."""
    step_index: int
    """-1 in the shadow phase, else the index into ``steps``."""
    step: str
    steps: tuple[float, ...]
    summary: str
    """The whole status in one line."""
    started_at: float
    updated_at: float
    last_judgment: RolloutJudgment | None
    last_decision: dict[str, Any] | None
    """``action``, ``reason``, ``at`` of the controller's latest decision."""
    arms: dict[str, Any]
    """Per arm (stable, candidate): requests, errors, latencies, feedback, probes in the judged window."""
    shadow: dict[str, Any] | None
    """Shadow copies (agreement, LLR, noise floor, divergence) when the rollout shadows."""
    spec: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rollout:
        return cls(
            rollout_id=int(data["rollout_id"]), task=data["task"], stable=data["stable"],
            candidate=data["candidate"], state=data["state"], active=bool(data["active"]),
            weight=float(data["weight"]), step_index=int(data["step_index"]), step=data.get("step", ""),
            steps=tuple(float(s) for s in data.get("steps", ())), summary=data.get("summary", ""),
            started_at=float(data.get("started_at", 0.0)), updated_at=float(data.get("updated_at", 0.0)),
            last_judgment=RolloutJudgment.from_json(data.get("last_judgment")),
            last_decision=data.get("last_decision"), arms=data.get("arms", {}), shadow=data.get("shadow"),
            spec=data.get("spec", {}),
        )  # fmt: skip


@dataclass(frozen=True)
class RolloutEvent:
    """One entry of a rollout's history: a state change, judgment, decision, error, unload..."""

    at: float
    time: str
    """``at`` in ISO 8601 (UTC)."""
    kind: str
    """state, judgment, decision, evaluator_error, unload or restored."""
    rollout_id: int
    actor: str | None
    reason: str | None
    weight: float | None = None
    """State changes: the weight after it."""
    state_from: str | None = None
    state_to: str | None = None
    action: str | None = None
    """Decisions (and state changes): advance, hold, pause, resume, promote, rollback."""
    result: str | None = None
    """Judgments and decisions: the judgment's result."""
    score: float | None = None
    metric: str | None = None
    """Judgments and decisions: the deciding metric."""
    payload: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutEvent:
        payload = data.get("payload") or {}
        return cls(
            at=float(data["at"]), time=data.get("time", ""), kind=data["kind"],
            rollout_id=int(data.get("rollout_id", 0)), actor=data.get("actor"), reason=data.get("reason"),
            weight=data.get("weight"), state_from=data.get("state_from"), state_to=data.get("state_to"),
            action=data.get("action") or payload.get("action"), result=data.get("result"),
            score=data.get("score"), metric=data.get("metric"), payload=payload,
        )  # fmt: skip


@dataclass(frozen=True)
class Feedback:
    """Feedback the server accepted for a completion."""

    id: str
    score: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Feedback:
        return cls(id=data["id"], score=float(data["score"]))



def _completion(data: dict[str, Any]) -> Completion:
    choice = data["choices"][0]
    return Completion(
        id=data["id"], model=data["model"], created=data["created"], text=choice["text"],
        finish_reason=choice.get("finish_reason"), usage=Usage.from_json(data.get("usage")),
        logprobs=choice.get("logprobs"),
    )  # fmt: skip


def _completion_chunk(data: dict[str, Any]) -> CompletionChunk:
    choice = data["choices"][0] if data.get("choices") else {}
    return CompletionChunk(
        id=data["id"], model=data["model"], created=data["created"], text=choice.get("text", ""),
        finish_reason=choice.get("finish_reason"), usage=Usage.from_json(data.get("usage")),
    )  # fmt: skip


def _chat_completion(data: dict[str, Any]) -> ChatCompletion:
    choice = data["choices"][0]
    message = choice.get("message", {})
    return ChatCompletion(
        id=data["id"], model=data["model"], created=data["created"],
        content=message.get("content") or "", finish_reason=choice.get("finish_reason"),
        usage=Usage.from_json(data.get("usage")), role=message.get("role", "assistant"),
    )  # fmt: skip


def _chat_chunk(data: dict[str, Any]) -> ChatCompletionChunk:
    choice = data["choices"][0] if data.get("choices") else {}
    delta = choice.get("delta", {})
    return ChatCompletionChunk(
        id=data["id"], model=data["model"], created=data["created"],
        content=delta.get("content") or "", finish_reason=choice.get("finish_reason"),
        role=delta.get("role"), usage=Usage.from_json(data.get("usage")),
    )  # fmt: skip


# ---- wire helpers --------------------------------------------------------------------------


def _error_from(response: httpx.Response) -> PeftserveError:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        text = response.text.strip() or response.reason_phrase
        return PeftserveError(response.status_code, text)
    return PeftserveError(
        response.status_code, str(error.get("message", "")), error.get("type"), error.get("param"),
        error.get("code"),
    )  # fmt: skip


def _stream_error(error: dict[str, Any]) -> PeftserveError:
    """An error sent inside a 200 event stream."""
    status = 503 if error.get("code") == "aborted" else 500
    return PeftserveError(
        status, str(error.get("message", "")), error.get("type"), error.get("param"), error.get("code")
    )


def _sse_payload(line: str) -> dict[str, Any] | None:
    """The JSON of one ``data:`` line; None for other lines and ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if payload == "[DONE]":
        return None
    data = json.loads(payload)
    if "error" in data:
        raise _stream_error(data["error"])
    return data


def _unreachable(base_url: str, exc: httpx.HTTPError) -> PeftserveError:
    return PeftserveError(0, f"cannot reach the peftserve server at {base_url}: {exc}", "connection_error")


@dataclass(frozen=True)
class UploadBody:
    """A multipart/form-data body streamed from an adapter directory."""

    content_type: str
    size: int
    parts: list[tuple[bytes, Path]]
    """(part header, file) in order; the closing boundary comes last."""
    closing: bytes

    @classmethod
    def from_dir(cls, path: str | Path, base_fingerprint: str | None = None) -> UploadBody:
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"adapter directory {directory} does not exist")
        missing = [name for name in UPLOAD_FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} has no {' or '.join(missing)} (only safetensors weights are accepted; "
                "save the adapter with save_pretrained(..., safe_serialization=True))"
            )
        boundary = secrets.token_hex(16)
        fields = b""
        if base_fingerprint:
            fields = (f'--{boundary}\r\nContent-Disposition: form-data; name="base_fingerprint"'
                      f"\r\n\r\n{base_fingerprint}\r\n").encode()  # fmt: skip
        parts = [(_part_header(boundary, name), directory / name) for name in UPLOAD_FILES]
        parts[0] = (fields + parts[0][0], parts[0][1])
        closing = f"--{boundary}--\r\n".encode()
        size = sum(len(h) + f.stat().st_size + 2 for h, f in parts) + len(closing)
        return cls(f"multipart/form-data; boundary={boundary}", size, parts, closing)

    def chunks(self, progress: Progress | None = None) -> Iterator[bytes]:
        for header, file in self.parts:
            yield header
            with open(file, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk
            yield b"\r\n"
        yield self.closing

    async def achunks(self, progress: Progress | None = None) -> AsyncIterator[bytes]:
        for chunk in self.chunks(progress):
            yield chunk

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": self.content_type, "Content-Length": str(self.size)}


def _part_header(boundary: str, name: str) -> bytes:
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip


def _generation_body(model: str, stream: bool, params: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body = {"model": model, **fields, **params}
    if stream:
        body["stream"] = True
    return body


def _adapter_path(task: str, version: str | None = None, action: str | None = None) -> str:
    path = f"/admin/adapters/{_segment(task)}"
    if version is not None:
        path += f"/{_segment(version)}"
    return path + (f"/{action}" if action else "")


def _rollout_path(task: str | None = None, action: str | None = None) -> str:
    path = "/admin/rollouts"
    if task is not None:
        path += f"/{_segment(task)}"
    return path + (f"/{action}" if action else "")


def rollout_body(
    task: str,
    candidate: str,
    *,
    stable: str | None = None,
    steps: Sequence[float] | None = None,
    step_interval_s: float | None = None,
    shadow_percent: float | None = None,
    targeting: Sequence[dict[str, Any]] | None = None,
    analysis: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
    min_samples: int | None = None,
    eval_set: Sequence[dict[str, str]] | str | Path | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /admin/rollouts``; fields left None take the server's defaults.

    ``eval_set``: a list of ``{"prompt", "answer"}``, or a path to a JSONL file of them.
    ``min_samples`` goes into ``analysis``.
    """
    body: dict[str, Any] = {"task": task, "candidate": candidate}
    optional = {"stable": stable, "steps": list(steps) if steps is not None else None,
                "step_interval_s": step_interval_s, "shadow_percent": shadow_percent,
                "targeting": list(targeting) if targeting is not None else None, "policy": policy,
                "reason": reason}  # fmt: skip
    body.update({k: v for k, v in optional.items() if v is not None})
    if analysis is not None or min_samples is not None:
        body["analysis"] = {**(analysis or {}), **({"min_samples": min_samples} if min_samples is not None else {})}
    if isinstance(eval_set, (str, Path)):
        body["eval_set"] = Path(eval_set).read_text()
    elif eval_set is not None:
        body["eval_set"] = list(eval_set)
    return body


def _reason(reason: str | None) -> dict[str, Any]:
    return {"json": {"reason": reason}} if reason else {}


def _segment(value: str) -> str:
    return quote(value, safe="")


def _settings(
    base_url: str | None, admin_token: str | None, api_key: str | None
) -> tuple[str, str | None, str | None]:
    url = (base_url or os.environ.get("PEFTSERVE_SERVER") or DEFAULT_SERVER).rstrip("/")
    token = admin_token if admin_token is not None else os.environ.get("PEFTSERVE_ADMIN_TOKEN")
    key = api_key if api_key is not None else os.environ.get("PEFTSERVE_API_KEY")
    return url, token or None, key or None


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


# ---- the clients ---------------------------------------------------------------------------


class Client:
    """A blocking client. Use as a context manager, or call ``close()``."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        admin_token: str | None = None,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url, self._admin_token, self._api_key = _settings(base_url, admin_token, api_key)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- adapters (admin) --

    def upload(
        self,
        path: str | Path,
        name: str,
        version: str,
        *,
        base_fingerprint: str | None = None,
        progress: Progress | None = None,
    ) -> Adapter:
        """Upload the adapter in directory ``path`` as ``name@version`` (served as soon as it returns)."""
        body = UploadBody.from_dir(path, base_fingerprint)
        data = self._admin("PUT", _adapter_path(name, version), content=body.chunks(progress),
                           headers=body.headers)  # fmt: skip
        return Adapter.from_json(data)

    register = upload

    def list(self, task: str | None = None) -> builtins.list[Adapter]:
        """Every registered version (of ``task`` if given)."""
        params = {"task": task} if task else None
        return [Adapter.from_json(a) for a in self._admin("GET", "/admin/adapters", params=params)["data"]]

    def show(self, task: str, version: str) -> Adapter:
        return Adapter.from_json(self._admin("GET", _adapter_path(task, version)))

    def task(self, task: str) -> Task:
        """The task's stable version and all its versions."""
        return Task.from_json(self._admin("GET", _adapter_path(task)))

    def delete(self, task: str, version: str) -> Adapter:
        """Delete a version (refused with 409 for a task's stable version)."""
        return Adapter.from_json(self._admin("DELETE", _adapter_path(task, version)))

    def load(self, task: str, version: str) -> Adapter:
        """Load a version into an adapter slot now."""
        return Adapter.from_json(self._admin("POST", _adapter_path(task, version, "load")))

    def unload(self, task: str, version: str) -> Adapter:
        """Free a version's adapter slot (it stays registered)."""
        return Adapter.from_json(self._admin("POST", _adapter_path(task, version, "unload")))

    # -- rollouts (admin) and feedback --

    def start_rollout(self, task: str, candidate: str, **options: Any) -> Rollout:
        """Start rolling ``candidate`` out for ``task``; ``options`` as :func:`rollout_body`
        (stable, steps, step_interval_s, shadow_percent, targeting, analysis, policy,
        min_samples, eval_set, reason)."""
        return Rollout.from_json(self._admin("POST", _rollout_path(), json=rollout_body(task, candidate, **options)))

    def rollout(self, task: str) -> Rollout:
        """Where the task's latest rollout stands."""
        return Rollout.from_json(self._admin("GET", _rollout_path(task)))

    def rollouts(self) -> builtins.list[Rollout]:
        """The latest rollout of every task that had one."""
        return [Rollout.from_json(r) for r in self._admin("GET", _rollout_path())["data"]]

    def pause_rollout(self, task: str, reason: str | None = None) -> Rollout:
        return self._steer(task, "pause", reason)

    def resume_rollout(self, task: str, reason: str | None = None) -> Rollout:
        return self._steer(task, "resume", reason)

    def promote_rollout(self, task: str, reason: str | None = None) -> Rollout:
        """Promote the candidate now, whatever the judgments say."""
        return self._steer(task, "promote", reason)

    def rollback_rollout(self, task: str, reason: str | None = None) -> Rollout:
        """Roll back now: the candidate's weight drops to 0 at once."""
        return self._steer(task, "rollback", reason)

    def retry_rollout(self, task: str, reason: str | None = None) -> Rollout:
        """Start the task's rolled-back rollout again (same spec and eval set)."""
        return self._steer(task, "retry", reason)

    def rollout_history(
        self, task: str, limit: int = 100, kinds: builtins.list[str] | None = None
    ) -> builtins.list[RolloutEvent]:
        """The task's latest ``limit`` rollout events (of ``kinds`` if given), oldest first."""
        params: dict[str, Any] = {"limit": limit, **({"kind": kinds} if kinds else {})}
        data = self._admin("GET", _rollout_path(task, "history"), params=params)
        return [RolloutEvent.from_json(e) for e in data["data"]]

    def feedback(self, completion_id: str, score: float | bool) -> Feedback:
        """Score a completion (a number in [0, 1], or a bool) for the rollout judging its version."""
        body = {"id": completion_id, "score": score}
        return Feedback.from_json(self._v1("POST", "/v1/feedback", json=body))

    def _steer(self, task: str, action: str, reason: str | None) -> Rollout:
        return Rollout.from_json(self._admin("POST", _rollout_path(task, action), **_reason(reason)))

    # -- inference (OpenAI API) --

    def models(self) -> builtins.list[Model]:
        return [Model.from_json(m) for m in self._v1("GET", "/v1/models")["data"]]

    def completion(self, model: str, prompt: str | builtins.list[int], **params: Any) -> Completion:
        """A completion; ``params`` are OpenAI fields (max_tokens, temperature, stop, seed, ...)."""
        body = _generation_body(model, False, params, prompt=prompt)
        return _completion(self._v1("POST", "/v1/completions", json=body))

    def completion_stream(
        self, model: str, prompt: str | builtins.list[int], **params: Any
    ) -> Iterator[CompletionChunk]:
        body = _generation_body(model, True, params, prompt=prompt)
        for data in self._events("/v1/completions", body):
            yield _completion_chunk(data)

    def chat_completion(self, model: str, messages: builtins.list[dict[str, Any]], **params: Any) -> ChatCompletion:
        body = _generation_body(model, False, params, messages=messages)
        return _chat_completion(self._v1("POST", "/v1/chat/completions", json=body))

    def chat_completion_stream(
        self, model: str, messages: builtins.list[dict[str, Any]], **params: Any
    ) -> Iterator[ChatCompletionChunk]:
        body = _generation_body(model, True, params, messages=messages)
        for data in self._events("/v1/chat/completions", body):
            yield _chat_chunk(data)

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health", {})

    # -- plumbing --

    def _admin(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, _auth(self._admin_token), **kwargs)

    def _v1(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, _auth(self._api_key), **kwargs)

    def _request(self, method: str, path: str, auth: dict[str, str], **kwargs: Any) -> Any:
        headers = {**auth, **kwargs.pop("headers", {})}
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        if response.status_code >= 400:
            raise _error_from(response)
        return response.json()

    def _events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self._http.stream("POST", path, json=body, headers=_auth(self._api_key)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_from(response)
                for line in response.iter_lines():
                    data = _sse_payload(line)
                    if data is not None:
                        yield data
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None


class AsyncClient:
    """The asyncio client: ``Client``'s methods as coroutines, streams as async iterators."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        admin_token: str | None = None,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url, self._admin_token, self._api_key = _settings(base_url, admin_token, api_key)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- adapters (admin) --

    async def upload(
        self,
        path: str | Path,
        name: str,
        version: str,
        *,
        base_fingerprint: str | None = None,
        progress: Progress | None = None,
    ) -> Adapter:
        body = UploadBody.from_dir(path, base_fingerprint)
        data = await self._admin("PUT", _adapter_path(name, version), content=body.achunks(progress),
                                 headers=body.headers)  # fmt: skip
        return Adapter.from_json(data)

    register = upload

    async def list(self, task: str | None = None) -> builtins.list[Adapter]:
        params = {"task": task} if task else None
        data = await self._admin("GET", "/admin/adapters", params=params)
        return [Adapter.from_json(a) for a in data["data"]]

    async def show(self, task: str, version: str) -> Adapter:
        return Adapter.from_json(await self._admin("GET", _adapter_path(task, version)))

    async def task(self, task: str) -> Task:
        return Task.from_json(await self._admin("GET", _adapter_path(task)))

    async def delete(self, task: str, version: str) -> Adapter:
        return Adapter.from_json(await self._admin("DELETE", _adapter_path(task, version)))

    async def load(self, task: str, version: str) -> Adapter:
        return Adapter.from_json(await self._admin("POST", _adapter_path(task, version, "load")))

    async def unload(self, task: str, version: str) -> Adapter:
        return Adapter.from_json(await self._admin("POST", _adapter_path(task, version, "unload")))

    # -- rollouts (admin) and feedback --

    async def start_rollout(self, task: str, candidate: str, **options: Any) -> Rollout:
        body = rollout_body(task, candidate, **options)
        return Rollout.from_json(await self._admin("POST", _rollout_path(), json=body))

    async def rollout(self, task: str) -> Rollout:
        return Rollout.from_json(await self._admin("GET", _rollout_path(task)))

    async def rollouts(self) -> builtins.list[Rollout]:
        return [Rollout.from_json(r) for r in (await self._admin("GET", _rollout_path()))["data"]]

    async def pause_rollout(self, task: str, reason: str | None = None) -> Rollout:
        return await self._steer(task, "pause", reason)

    async def resume_rollout(self, task: str, reason: str | None = None) -> Rollout:
        return await self._steer(task, "resume", reason)

    async def promote_rollout(self, task: str, reason: str | None = None) -> Rollout:
        return await self._steer(task, "promote", reason)

    async def rollback_rollout(self, task: str, reason: str | None = None) -> Rollout:
        return await self._steer(task, "rollback", reason)

    async def retry_rollout(self, task: str, reason: str | None = None) -> Rollout:
        return await self._steer(task, "retry", reason)

    async def rollout_history(
        self, task: str, limit: int = 100, kinds: builtins.list[str] | None = None
    ) -> builtins.list[RolloutEvent]:
        params: dict[str, Any] = {"limit": limit, **({"kind": kinds} if kinds else {})}
        data = await self._admin("GET", _rollout_path(task, "history"), params=params)
        return [RolloutEvent.from_json(e) for e in data["data"]]

    async def feedback(self, completion_id: str, score: float | bool) -> Feedback:
        body = {"id": completion_id, "score": score}
        return Feedback.from_json(await self._v1("POST", "/v1/feedback", json=body))

    async def _steer(self, task: str, action: str, reason: str | None) -> Rollout:
        return Rollout.from_json(await self._admin("POST", _rollout_path(task, action), **_reason(reason)))

    # -- inference (OpenAI API) --

    async def models(self) -> builtins.list[Model]:
        return [Model.from_json(m) for m in (await self._v1("GET", "/v1/models"))["data"]]

    async def completion(self, model: str, prompt: str | builtins.list[int], **params: Any) -> Completion:
        body = _generation_body(model, False, params, prompt=prompt)
        return _completion(await self._v1("POST", "/v1/completions", json=body))

    async def completion_stream(
        self, model: str, prompt: str | builtins.list[int], **params: Any
    ) -> AsyncIterator[CompletionChunk]:
        body = _generation_body(model, True, params, prompt=prompt)
        async for data in self._events("/v1/completions", body):
            yield _completion_chunk(data)

    async def chat_completion(
        self, model: str, messages: builtins.list[dict[str, Any]], **params: Any
    ) -> ChatCompletion:
        body = _generation_body(model, False, params, messages=messages)
        return _chat_completion(await self._v1("POST", "/v1/chat/completions", json=body))

    async def chat_completion_stream(
        self, model: str, messages: builtins.list[dict[str, Any]], **params: Any
    ) -> AsyncIterator[ChatCompletionChunk]:
        body = _generation_body(model, True, params, messages=messages)
        async for data in self._events("/v1/chat/completions", body):
            yield _chat_chunk(data)

    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/health", {})

    # -- plumbing --

    async def _admin(self, method: str, path: str, **kwargs: Any) -> Any:
        return await self._request(method, path, _auth(self._admin_token), **kwargs)

    async def _v1(self, method: str, path: str, **kwargs: Any) -> Any:
        return await self._request(method, path, _auth(self._api_key), **kwargs)

    async def _request(self, method: str, path: str, auth: dict[str, str], **kwargs: Any) -> Any:
        headers = {**auth, **kwargs.pop("headers", {})}
        try:
            response = await self._http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        if response.status_code >= 400:
            raise _error_from(response)
        return response.json()

    async def _events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            async with self._http.stream("POST", path, json=body, headers=_auth(self._api_key)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error_from(response)
                async for line in response.aiter_lines():
                    data = _sse_payload(line)
                    if data is not None:
                        yield data
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
