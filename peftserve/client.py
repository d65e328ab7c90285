"""Python client for a peftserve server: adapters (the admin API) and completions (the OpenAI API).

    from peftserve import Client

    with Client("http://127.0.0.1:8000") as client:
        client.upload("adapters/reverse-v2", name="reverse", version="v2")
        done = client.completion("reverse@v2", "reverse: hello\\n", max_tokens=16, temperature=0)
        print(done.text, done.served_by, done.arm)      # olleh reverse@v2 pinned
        for chunk in client.completion_stream("reverse", "reverse: hello\\n", max_tokens=16):
            print(chunk.text, end="")
        client.start_rollout("reverse", "v2", steps="5,25,50", interval=300)
        print(client.rollout("reverse").summary)

``AsyncClient`` has the same methods as coroutines (streams as async iterators). Settings
left out come from the environment: ``PEFTSERVE_SERVER`` (default http://127.0.0.1:8000; a
bare ``host:port`` means http), ``PEFTSERVE_ADMIN_TOKEN`` (sent to /admin) and
``PEFTSERVE_API_KEY`` (sent to /v1). A failed call raises ``PeftserveError`` with the server's
status and OpenAI-shaped error fields (status 0 when the server could not be reached); an
argument the client can check itself (steps, a ``task@version`` reference, an adapter
directory) raises ``ValueError`` or ``FileNotFoundError`` before anything is sent.

Every call is written once, in ``_Api``: a method there builds a :class:`Request` (method,
path, body, how to read the answer) and the client it is called on sends it, blocking
(``Client``) or awaited (``AsyncClient``), as openai-python's base client does. A new call is
one ``@endpoint`` (or ``@stream_endpoint``) method in ``_Api``; both clients have it at once.
"""

from __future__ import annotations

import builtins
import functools
import inspect
import json
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload
from urllib.parse import quote

import httpx

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_SERVER = "http://127.0.0.1:8000"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
UPLOAD_FILES = (CONFIG_NAME, WEIGHTS_NAME)
"""Uploaded in this order (the server needs the config first)."""
CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
VERSION_HEADER = "x-peftserve-version"
ARM_HEADER = "x-peftserve-arm"
MISSING_TOKEN_CODE = "missing_admin_token"
"""The server's error code when an admin route got no token."""

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
    served_by: str | None = None
    """``task@version`` that answered (the base model's name for the base model)."""
    arm: str | None = None
    """stable, candidate (a rollout's candidate) or pinned (the request named its version)."""


@dataclass(frozen=True)
class CompletionChunk:
    """One streamed piece of a completion; the last one (with stream usage) may have no text."""

    id: str
    model: str
    created: int
    text: str
    finish_reason: str | None
    usage: Usage | None = None
    served_by: str | None = None
    arm: str | None = None


@dataclass(frozen=True)
class ChatCompletion:
    id: str
    model: str
    created: int
    content: str
    finish_reason: str | None
    usage: Usage | None
    role: str = "assistant"
    served_by: str | None = None
    arm: str | None = None


@dataclass(frozen=True)
class ChatCompletionChunk:
    id: str
    model: str
    created: int
    content: str
    finish_reason: str | None
    role: str | None = None
    usage: Usage | None = None
    served_by: str | None = None
    arm: str | None = None


@dataclass(frozen=True)
class RolloutJudgment:
    """The latest judgment of a rollout: candidate against stable, with its evidence."""

    at: float
    result: str
    """pass, fail, pending, nodata or error (the evaluator failed)."""
    progress: float | None
    """0-1: share of the evidence the next decision needs (least over the metrics); None: unknown."""
    reason: str
    deciding_metric: str | None
    metrics: tuple[dict[str, Any], ...]
    """Per metric (and failed or suspect segment): status, test, samples per arm, harm and its
    bounds, tolerance, mde, samples needed, detail."""

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RolloutJudgment | None:
        if not data:
            return None
        return cls(
            at=float(data.get("at", 0.0)), result=data["result"], progress=data.get("progress"),
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
    """Per arm (stable, candidate): requests, errors, latencies, feedback, probes of the rollout."""
    next: dict[str, Any] | None
    """What the rollout waits for: ``action`` (advance or promote), ``ready``, ``summary`` and per
    required metric ``samples``, ``needed``, ``time_left_s``."""
    plan: dict[str, Any] | None
    """The estimate made at start: ``expected_s``, per step and metric, ``warnings``."""
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
            last_decision=data.get("last_decision"), arms=data.get("arms", {}), next=data.get("next"),
            plan=data.get("plan"), shadow=data.get("shadow"),
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
    progress: float | None = None
    """Judgments and decisions: the judgment's progress toward the next decision (0-1)."""
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
            progress=data.get("progress"), metric=data.get("metric"), payload=payload,
        )  # fmt: skip


@dataclass(frozen=True)
class Feedback:
    """Feedback the server accepted for a completion."""

    id: str
    score: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Feedback:
        return cls(id=data["id"], score=float(data["score"]))


Headers = Mapping[str, str]


def _served(headers: Headers) -> dict[str, str | None]:
    """What served a response, from its headers: ``served_by`` and ``arm``."""
    return {"served_by": headers.get(VERSION_HEADER), "arm": headers.get(ARM_HEADER)}


def _completion(data: dict[str, Any], headers: Headers) -> Completion:
    choice = data["choices"][0]
    return Completion(
        id=data["id"], model=data["model"], created=data["created"], text=choice["text"],
        finish_reason=choice.get("finish_reason"), usage=Usage.from_json(data.get("usage")),
        logprobs=choice.get("logprobs"), **_served(headers),
    )  # fmt: skip


def _completion_chunk(data: dict[str, Any], headers: Headers) -> CompletionChunk:
    choice = data["choices"][0] if data.get("choices") else {}
    return CompletionChunk(
        id=data["id"], model=data["model"], created=data["created"], text=choice.get("text", ""),
        finish_reason=choice.get("finish_reason"), usage=Usage.from_json(data.get("usage")),
        **_served(headers),
    )  # fmt: skip


def _chat_completion(data: dict[str, Any], headers: Headers) -> ChatCompletion:
    choice = data["choices"][0]
    message = choice.get("message", {})
    return ChatCompletion(
        id=data["id"], model=data["model"], created=data["created"],
        content=message.get("content") or "", finish_reason=choice.get("finish_reason"),
        usage=Usage.from_json(data.get("usage")), role=message.get("role", "assistant"),
        **_served(headers),
    )  # fmt: skip


def _chat_chunk(data: dict[str, Any], headers: Headers) -> ChatCompletionChunk:
    choice = data["choices"][0] if data.get("choices") else {}
    delta = choice.get("delta", {})
    return ChatCompletionChunk(
        id=data["id"], model=data["model"], created=data["created"],
        content=delta.get("content") or "", finish_reason=choice.get("finish_reason"),
        role=delta.get("role"), usage=Usage.from_json(data.get("usage")), **_served(headers),
    )  # fmt: skip


def _body(parse: Callable[[Any], T]) -> Callable[[Any, Headers], T]:
    """A reader of the JSON body alone."""
    return lambda data, headers: parse(data)


def _listed(parse: Callable[[Any], T]) -> Callable[[Any, Headers], builtins.list[T]]:
    """A reader of a ``{"data": [...]}`` list answer."""
    return lambda data, headers: [parse(item) for item in data["data"]]


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
        status,
        str(error.get("message", "")),
        error.get("type"),
        error.get("param"),
        error.get("code"),
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
    return PeftserveError(
        0, f"cannot reach the peftserve server at {base_url}: {exc}", "connection_error"
    )


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
        check_adapter_dir(directory)
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


def check_adapter_dir(directory: Path) -> None:
    """Raise FileNotFoundError, saying what to give instead, unless ``directory`` holds a PEFT adapter."""
    if not directory.exists():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    if not directory.is_dir():
        hint = f"; give its directory {directory.parent}" if directory.name in UPLOAD_FILES else ""
        raise FileNotFoundError(
            f"{directory} is a file, not an adapter directory (one holding {CONFIG_NAME} and {WEIGHTS_NAME}){hint}"
        )
    if not (directory / CONFIG_NAME).is_file():
        inside = sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
        hint = (f"; it holds adapter directories: {', '.join(inside)}" if inside
                else "; a PEFT adapter directory is what save_pretrained() writes")  # fmt: skip
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}, so it is not a PEFT adapter directory{hint}"
        )
    if not (directory / WEIGHTS_NAME).is_file():
        pickled = (directory / "adapter_model.bin").is_file()
        hint = (" (it has adapter_model.bin, pickle weights, which are refused: save the adapter with "
                "save_pretrained(..., safe_serialization=True))" if pickled else "")  # fmt: skip
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}{hint}")


def _part_header(boundary: str, name: str) -> bytes:
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip


# ---- arguments, as the CLI spells them -------------------------------------------------------


def split_ref(
    ref: str, version: str | None = None, *, need_version: bool = True
) -> tuple[str, str | None]:
    """``("task@version")`` or ``("task", "version")`` -> (task, version); ValueError when malformed.

    Without ``need_version`` a bare task gives (task, None).
    """
    if not isinstance(ref, str):
        raise ValueError(f"expected a task name or task@version, not {type(ref).__name__}")
    task, sep, pinned = ref.partition("@")
    if version is not None:
        if sep:
            raise ValueError(f"give either {ref!r} or a separate version {version!r}, not both")
        pinned, sep = version, "@"
    if not task or (sep and not pinned) or "@" in pinned or (need_version and not sep):
        shape = "TASK@VERSION" if need_version else "TASK or TASK@VERSION"
        raise ValueError(f"expected {shape}, not {ref + ('@' + version if version else '')!r}")
    return task, pinned or None


def parse_steps(steps: str | Sequence[float]) -> builtins.list[float]:
    """Canary steps as ``"1,5,10"`` (the CLI's form) or a sequence of numbers, as floats."""
    shape = "steps must be comma-separated percentages like '1,5,10' or a list of numbers"
    if isinstance(steps, str):
        items: builtins.list[Any] = [s.strip() for s in steps.split(",") if s.strip()]
    elif isinstance(steps, Sequence) and not isinstance(steps, bytes):
        items = builtins.list(steps)
    else:
        raise ValueError(f"{shape}, not {steps!r}")
    values = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, bool) or not isinstance(item, (int, float, str)):
                raise TypeError
            values.append(float(item))
        except (TypeError, ValueError):
            raise ValueError(f"{shape}; step {i + 1} is {item!r}") from None
    return values


def parse_metric_values(values: str | Mapping[str, float] | Sequence[str]) -> dict[str, float]:
    """Per-metric numbers: ``"latency=0.2"`` (the CLI's form, repeatable), a list of them, or a
    mapping ``{"latency": 0.2}`` -> ``{"latency": 0.2}``; ValueError when malformed."""
    if isinstance(values, Mapping):
        return {str(k): float(v) for k, v in values.items()}
    items = [values] if isinstance(values, str) else builtins.list(values)
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name.strip() or number is None:
            raise ValueError(f"expected METRIC=NUMBER, e.g. latency=0.2, not {item!r}")
        out[name.strip()] = number
    return out


def parse_target_header(rule: str | Mapping[str, Any]) -> dict[str, Any]:
    """``'x-tier=internal,beta'`` (the CLI's form) -> a targeting rule: the header must hold one of the values.

    A mapping is taken as a rule already (``{"header", "values", "op"}``).
    """
    if isinstance(rule, Mapping):
        return dict(rule)
    if not isinstance(rule, str):
        raise ValueError(f"a target header must look like HEADER=VALUE[,VALUE...], not {rule!r}")
    header, sep, values = rule.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not header.strip() or not items:
        raise ValueError(f"a target header must look like HEADER=VALUE[,VALUE...], not {rule!r}")
    return {"header": header.strip(), "values": items, "op": "in"}


def read_eval_set(eval_set: str | Path | Sequence[Mapping[str, str]]) -> str:
    """An eval set as sent, JSONL text: a file's (from its path), or a list of ``{"prompt", "answer"}``
    one per line (so the server's errors name line N, the Nth item)."""
    if isinstance(eval_set, (str, Path)):
        path = Path(eval_set)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise FileNotFoundError(
                f'eval set file {path} {what} (one {{"prompt", "answer"}} object per line)'
            )
        return path.read_text()
    if isinstance(eval_set, Mapping) or not isinstance(eval_set, Sequence):
        raise ValueError(f"eval_set must be a JSONL file path or a list of {{\"prompt\", \"answer\"}} objects, "
                         f"not {type(eval_set).__name__}")  # fmt: skip
    return "".join(json.dumps(item) + "\n" for item in eval_set)


def rollout_body(
    task: str,
    candidate: str,
    *,
    stable: str | None = None,
    steps: str | Sequence[float] | None = None,
    interval: float | None = None,
    min_samples: int | None = None,
    shadow_percent: float | None = None,
    eval_set: str | Path | Sequence[Mapping[str, str]] | None = None,
    target_header: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]] | None = None,
    analysis: Mapping[str, Any] | None = None,
    policy: Mapping[str, Any] | None = None,
    reason: str | None = None,
    tolerance: str | Mapping[str, float] | Sequence[str] | None = None,
    mde: str | Mapping[str, float] | Sequence[str] | None = None,
    probe_temperature: float | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /admin/rollouts``; arguments left None take the server's defaults.

    The names are the CLI's (``peftserve rollout start --help``): ``steps`` as ``"1,5,10"`` or
    a list of percentages; ``interval`` seconds at each step; ``eval_set`` a JSONL file path or
    a list of ``{"prompt", "answer"}``; ``target_header`` one or more ``"HEADER=V1[,V2]"`` (or
    rule mappings); ``min_samples`` goes into ``analysis``; ``tolerance`` and ``mde`` per metric
    (``{"latency": 0.2}`` or ``"latency=0.2"`` strings): the harm accepted, and the smallest harm
    a promotion must rule out.
    """
    body: dict[str, Any] = {"task": task, "candidate": candidate}
    if isinstance(target_header, (str, Mapping)):
        target_header = [target_header]
    targeting = None if target_header is None else [parse_target_header(r) for r in target_header]
    optional = {
        "stable": stable,
        "steps": parse_steps(steps) if steps is not None else None,
        "step_interval_s": interval,
        "shadow_percent": shadow_percent,
        "targeting": targeting,
        "policy": dict(policy) if policy is not None else None,
        "reason": reason,
        "tolerances": parse_metric_values(tolerance) if tolerance is not None else None,
        "mdes": parse_metric_values(mde) if mde is not None else None,
        "probe_temperature": probe_temperature,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if analysis is not None or min_samples is not None:
        body["analysis"] = {
            **(analysis or {}),
            **({"min_samples": min_samples} if min_samples is not None else {}),
        }
    if eval_set is not None:
        body["eval_set"] = read_eval_set(eval_set)
    return body


def _generation_body(
    model: str, stream: bool, fields: Mapping[str, Any], extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A completion request's JSON: the fields given (None means the server's default), then ``extra``."""
    body = {"model": model, **{k: v for k, v in fields.items() if v is not None}, **(extra or {})}
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


def _segment(value: str) -> str:
    return quote(value, safe="")


def server_url(base_url: str | None = None) -> str:
    """The server's URL: ``base_url``, else ``PEFTSERVE_SERVER``, else the default; ``host:port`` means http."""
    url = (base_url or os.environ.get("PEFTSERVE_SERVER") or DEFAULT_SERVER).strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


# ---- requests: every call written once -------------------------------------------------------


@dataclass(frozen=True)
class Request(Generic[T]):
    """One call of the API, described once; ``Client`` and ``AsyncClient`` send it."""

    method: str
    path: str
    read: Callable[[Any, Headers], T]
    """The result, from the answer's JSON (each event's JSON for a stream) and its headers."""
    auth: Literal["admin", "api", "none"] = "api"
    """Which credential goes in ``Authorization``: the admin token, the API key, or none."""
    params: Mapping[str, Any] | None = None
    json: Any = None
    upload: UploadBody | None = None
    progress: Progress | None = None


class endpoint(Generic[P, T]):
    """Makes an ``_Api`` method that builds a :class:`Request` into a method that sends it.

    On a ``Client`` the method returns the result; on an ``AsyncClient`` it is a coroutine.
    """

    stream = False

    def __init__(self, build: Callable[Concatenate[Any, P], Request[T]]) -> None:
        self.build = build
        functools.update_wrapper(self, build)
        signature = inspect.signature(build)
        self.signature = signature.replace(
            parameters=builtins.list(signature.parameters.values())[1:],
            return_annotation=inspect.Signature.empty,
        )

    @overload
    def __get__(self, client: None, owner: type | None = None) -> endpoint[P, T]: ...
    @overload
    def __get__(self, client: Client, owner: type | None = None) -> Callable[P, T]: ...
    @overload
    def __get__(
        self, client: AsyncClient, owner: type | None = None
    ) -> Callable[P, Awaitable[T]]: ...
    def __get__(self, client: Any, owner: type | None = None) -> Any:
        return self if client is None else client._bind(self)


class stream_endpoint(endpoint[P, T]):
    """``endpoint`` for an event stream: an iterator of results (an async iterator on ``AsyncClient``)."""

    stream = True

    @overload  # type: ignore[override]
    def __get__(self, client: None, owner: type | None = None) -> stream_endpoint[P, T]: ...
    @overload
    def __get__(self, client: Client, owner: type | None = None) -> Callable[P, Iterator[T]]: ...
    @overload
    def __get__(
        self, client: AsyncClient, owner: type | None = None
    ) -> Callable[P, AsyncIterator[T]]: ...
    def __get__(self, client: Any, owner: type | None = None) -> Any:
        return self if client is None else client._bind(self)


class _Api:
    """The calls of both clients. Each method returns the :class:`Request` its client sends."""

    # -- adapters (admin) --

    @endpoint
    def upload(
        self,
        path: str | Path,
        name: str,
        version: str,
        *,
        base_fingerprint: str | None = None,
        progress: Progress | None = None,
    ) -> Request[Adapter]:
        """Upload the adapter in directory ``path`` as ``name@version`` (served as soon as it returns)."""
        body = UploadBody.from_dir(path, base_fingerprint)
        return Request("PUT", _adapter_path(name, version), _body(Adapter.from_json), "admin",
                       upload=body, progress=progress)  # fmt: skip

    register = upload

    @endpoint
    def list(self, task: str | None = None) -> Request[builtins.list[Adapter]]:
        """Every registered version (of ``task`` if given)."""
        params = {"task": task} if task else None
        return Request("GET", "/admin/adapters", _listed(Adapter.from_json), "admin", params=params)

    @endpoint
    def show(self, ref: str, version: str | None = None) -> Request[Adapter]:
        """One version: ``show("reverse@v2")`` or ``show("reverse", "v2")``."""
        task, version = split_ref(ref, version)
        return Request("GET", _adapter_path(task, version), _body(Adapter.from_json), "admin")

    @endpoint
    def task(self, task: str) -> Request[Task]:
        """The task's stable version and all its versions."""
        return Request("GET", _adapter_path(task), _body(Task.from_json), "admin")

    @endpoint
    def delete(self, ref: str, version: str | None = None) -> Request[Adapter]:
        """Delete a version (``"task@version"`` or task, version); 409 for a task's stable version."""
        task, version = split_ref(ref, version)
        return Request("DELETE", _adapter_path(task, version), _body(Adapter.from_json), "admin")

    @endpoint
    def load(self, ref: str, version: str | None = None) -> Request[Adapter]:
        """Load a version into an adapter slot now."""
        task, version = split_ref(ref, version)
        return Request(
            "POST", _adapter_path(task, version, "load"), _body(Adapter.from_json), "admin"
        )

    @endpoint
    def unload(self, ref: str, version: str | None = None) -> Request[Adapter]:
        """Free a version's adapter slot (it stays registered)."""
        task, version = split_ref(ref, version)
        return Request(
            "POST", _adapter_path(task, version, "unload"), _body(Adapter.from_json), "admin"
        )

    # -- rollouts (admin) and feedback --

    @endpoint
    def start_rollout(
        self,
        task: str,
        candidate: str,
        *,
        stable: str | None = None,
        steps: str | Sequence[float] | None = None,
        interval: float | None = None,
        min_samples: int | None = None,
        shadow_percent: float | None = None,
        eval_set: str | Path | Sequence[Mapping[str, str]] | None = None,
        target_header: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]] | None = None,
        analysis: Mapping[str, Any] | None = None,
        policy: Mapping[str, Any] | None = None,
        reason: str | None = None,
        tolerance: str | Mapping[str, float] | Sequence[str] | None = None,
        mde: str | Mapping[str, float] | Sequence[str] | None = None,
        probe_temperature: float | None = None,
    ) -> Request[Rollout]:
        """Start rolling ``candidate`` out for ``task``, with the options of ``peftserve rollout start``.

        ``steps="1,5,10"`` or ``[1, 5, 10]`` (percent), ``interval`` (seconds at each step),
        ``eval_set`` (a JSONL file or a list of ``{"prompt", "answer"}``), ``target_header``
        (``"x-tier=internal,beta"`` or a list of them), ``tolerance`` and ``mde`` per metric
        (``{"latency": 0.2}``: the harm accepted, the smallest harm a promotion must rule out),
        ``probe_temperature``; ``analysis`` and ``policy`` as in ``POST /admin/rollouts``.
        Arguments left None take the server's defaults.
        """
        body = rollout_body(
            task, candidate, stable=stable, steps=steps, interval=interval, min_samples=min_samples,
            shadow_percent=shadow_percent, eval_set=eval_set, target_header=target_header,
            analysis=analysis, policy=policy, reason=reason, tolerance=tolerance, mde=mde,
            probe_temperature=probe_temperature,
        )  # fmt: skip
        return Request("POST", _rollout_path(), _body(Rollout.from_json), "admin", json=body)

    @endpoint
    def rollout(self, task: str) -> Request[Rollout]:
        """Where the task's latest rollout stands."""
        return Request("GET", _rollout_path(task), _body(Rollout.from_json), "admin")

    @endpoint
    def rollouts(self) -> Request[builtins.list[Rollout]]:
        """The latest rollout of every task that had one."""
        return Request("GET", _rollout_path(), _listed(Rollout.from_json), "admin")

    @endpoint
    def pause_rollout(self, task: str, reason: str | None = None) -> Request[Rollout]:
        """Stop the automatic progression (the weight stays)."""
        return _steer(task, "pause", reason)

    @endpoint
    def resume_rollout(self, task: str, reason: str | None = None) -> Request[Rollout]:
        """Resume a paused rollout."""
        return _steer(task, "resume", reason)

    @endpoint
    def promote_rollout(self, task: str, reason: str | None = None) -> Request[Rollout]:
        """Promote the candidate now, whatever the judgments say."""
        return _steer(task, "promote", reason)

    @endpoint
    def rollback_rollout(self, task: str, reason: str | None = None) -> Request[Rollout]:
        """Roll back now: the candidate's weight drops to 0 at once."""
        return _steer(task, "rollback", reason)

    @endpoint
    def retry_rollout(self, task: str, reason: str | None = None) -> Request[Rollout]:
        """Start the task's rolled-back rollout again (same spec and eval set)."""
        return _steer(task, "retry", reason)

    @endpoint
    def rollout_history(
        self, task: str, limit: int = 100, kinds: Sequence[str] | None = None
    ) -> Request[builtins.list[RolloutEvent]]:
        """The task's latest ``limit`` rollout events (of ``kinds`` if given), oldest first."""
        params: dict[str, Any] = {
            "limit": limit,
            **({"kind": builtins.list(kinds)} if kinds else {}),
        }
        return Request("GET", _rollout_path(task, "history"), _listed(RolloutEvent.from_json), "admin",
                       params=params)  # fmt: skip

    @endpoint
    def feedback(self, completion_id: str, score: float | bool) -> Request[Feedback]:
        """Score a completion (a number in [0, 1], or a bool) for the rollout judging its version."""
        body = {"id": completion_id, "score": score}
        return Request("POST", "/v1/feedback", _body(Feedback.from_json), json=body)

    # -- inference (OpenAI API) --

    @endpoint
    def models(self) -> Request[builtins.list[Model]]:
        """``GET /v1/models``: the base model, each task and each ``task@version``."""
        return Request("GET", "/v1/models", _listed(Model.from_json))

    @endpoint
    def completion(
        self,
        model: str,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        user: str | None = None,
        logprobs: int | None = None,
        ignore_eos: bool | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Request[Completion]:
        """``POST /v1/completions``; arguments left None take the server's defaults (OpenAI's meaning).

        ``model`` is a task, ``task@version`` or the base model's name; ``extra`` adds other
        request fields as they are. The result says what served it (``served_by``, ``arm``).
        """
        fields = dict(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                      top_k=top_k, seed=seed, stop=stop, user=user, logprobs=logprobs, ignore_eos=ignore_eos,
                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)  # fmt: skip
        return Request(
            "POST",
            "/v1/completions",
            _completion,
            json=_generation_body(model, False, fields, extra),
        )

    @stream_endpoint
    def completion_stream(
        self,
        model: str,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        user: str | None = None,
        ignore_eos: bool | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        include_usage: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> Request[CompletionChunk]:
        """:meth:`completion`, streamed; ``include_usage`` adds a last chunk with the usage."""
        fields = dict(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                      top_k=top_k, seed=seed, stop=stop, user=user, ignore_eos=ignore_eos,
                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                      stream_options={"include_usage": True} if include_usage else None)  # fmt: skip
        body = _generation_body(model, True, fields, extra)
        return Request("POST", "/v1/completions", _completion_chunk, json=body)

    @endpoint
    def chat_completion(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        user: str | None = None,
        ignore_eos: bool | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Request[ChatCompletion]:
        """``POST /v1/chat/completions``, arguments as :meth:`completion`."""
        fields = dict(messages=builtins.list(messages), max_tokens=max_tokens, temperature=temperature,
                      top_p=top_p, top_k=top_k, seed=seed, stop=stop, user=user, ignore_eos=ignore_eos,
                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)  # fmt: skip
        body = _generation_body(model, False, fields, extra)
        return Request("POST", "/v1/chat/completions", _chat_completion, json=body)

    @stream_endpoint
    def chat_completion_stream(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        user: str | None = None,
        ignore_eos: bool | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        include_usage: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> Request[ChatCompletionChunk]:
        """:meth:`chat_completion`, streamed; ``include_usage`` adds a last chunk with the usage."""
        fields = dict(messages=builtins.list(messages), max_tokens=max_tokens, temperature=temperature,
                      top_p=top_p, top_k=top_k, seed=seed, stop=stop, user=user, ignore_eos=ignore_eos,
                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                      stream_options={"include_usage": True} if include_usage else None)  # fmt: skip
        body = _generation_body(model, True, fields, extra)
        return Request("POST", "/v1/chat/completions", _chat_chunk, json=body)

    @endpoint
    def health(self) -> Request[dict[str, Any]]:
        """``GET /health``: the engine's state."""
        return Request("GET", "/health", _body(dict), "none")


def _steer(task: str, action: str, reason: str | None) -> Request[Rollout]:
    body = {"reason": reason} if reason else None
    return Request(
        "POST", _rollout_path(task, action), _body(Rollout.from_json), "admin", json=body
    )


# ---- the clients: how a Request is sent --------------------------------------------------------


class _Transport(_Api):
    """Settings and request preparation shared by both clients."""

    def __init__(self, base_url: str | None, admin_token: str | None, api_key: str | None) -> None:
        self.base_url = server_url(base_url)
        token = admin_token if admin_token is not None else os.environ.get("PEFTSERVE_ADMIN_TOKEN")
        key = api_key if api_key is not None else os.environ.get("PEFTSERVE_API_KEY")
        self._admin_token, self._api_key = token or None, key or None

    def _options(self, request: Request[Any], *, asynchronous: bool) -> dict[str, Any]:
        """httpx arguments of ``request``."""
        token = {"admin": self._admin_token, "api": self._api_key, "none": None}[request.auth]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        options: dict[str, Any] = {"headers": headers, "params": request.params}
        if request.upload is not None:
            headers.update(request.upload.headers)
            chunks = request.upload.achunks if asynchronous else request.upload.chunks
            options["content"] = chunks(request.progress)
        elif request.json is not None:
            options["json"] = request.json
        return options

    def _error(self, response: httpx.Response) -> PeftserveError:
        error = _error_from(response)
        if error.code == MISSING_TOKEN_CODE:
            error = PeftserveError(
                error.status, "this server needs the admin token for /admin: pass admin_token= to the "
                "client or set PEFTSERVE_ADMIN_TOKEN", error.type, error.param, error.code,
            )  # fmt: skip
        return error


class Client(_Transport):
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
        super().__init__(base_url, admin_token, api_key)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bind(self, endpoint: endpoint[Any, Any]) -> Callable[..., Any]:
        build, send = endpoint.build, self._stream if endpoint.stream else self._send

        @functools.wraps(build)
        def method(*args: Any, **kwargs: Any) -> Any:
            return send(build(self, *args, **kwargs))

        method.__signature__ = endpoint.signature  # type: ignore[attr-defined]
        return method

    def _send(self, request: Request[T]) -> T:
        try:
            response = self._http.request(
                request.method, request.path, **self._options(request, asynchronous=False)
            )
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        if response.status_code >= 400:
            raise self._error(response)
        return request.read(response.json(), response.headers)

    def _stream(self, request: Request[T]) -> Iterator[T]:
        options = self._options(request, asynchronous=False)
        try:
            with self._http.stream(request.method, request.path, **options) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._error(response)
                for line in response.iter_lines():
                    data = _sse_payload(line)
                    if data is not None:
                        yield request.read(data, response.headers)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None


class AsyncClient(_Transport):
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
        super().__init__(base_url, admin_token, api_key)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _bind(self, endpoint: endpoint[Any, Any]) -> Callable[..., Any]:
        build = endpoint.build
        if endpoint.stream:

            @functools.wraps(build)
            def method(*args: Any, **kwargs: Any) -> Any:
                return self._stream(build(self, *args, **kwargs))

        else:

            @functools.wraps(build)
            async def method(*args: Any, **kwargs: Any) -> Any:
                return await self._send(build(self, *args, **kwargs))

        method.__signature__ = endpoint.signature  # type: ignore[attr-defined]
        return method

    async def _send(self, request: Request[T]) -> T:
        options = self._options(request, asynchronous=True)
        try:
            response = await self._http.request(request.method, request.path, **options)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        if response.status_code >= 400:
            raise self._error(response)
        return request.read(response.json(), response.headers)

    async def _stream(self, request: Request[T]) -> AsyncIterator[T]:
        options = self._options(request, asynchronous=True)
        try:
            async with self._http.stream(request.method, request.path, **options) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._error(response)
                async for line in response.aiter_lines():
                    data = _sse_payload(line)
                    if data is not None:
                        yield request.read(data, response.headers)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
