"""Samples: plain, self-describing records of what each version did, as the judge needs them.

A record says everything the controller needs without asking anyone: the task, the version
and arm that answered, the *unit* that was routed (a 40-bit hash of the user or session, never
the raw id), the allocation stratum it was routed under (``"5%"``, ``"shadow"``, ``"probe"``),
the segments it belongs to, what happened (error, timings, lengths) and, when the engine said
so, what its engine steps were shared with (:class:`BatchShare`). ``to_dict``/``from_dict``
give JSON, so an ingress in another process (a Ray replica) can push records to the one
controller; nothing here refers to an engine, a router or a clock.

Records are built at the edge of the request path (the server's canary runtime) and recorded
into :class:`peftserve.canary.metrics.MetricWindows`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

UNIT_BITS = 40
"""Units are hashed to 40 bits; a collision merges two users into one cluster (conservative)."""
PROBE_STRATUM = "probe"
SHADOW_STRATUM = "shadow"
MAX_METADATA = 16
"""Metadata entries of one request taken as segment labels (OpenAI allows 16)."""
LENGTH_EDGES = (64, 256, 1024)
"""Prompt-length buckets (tokens) of the ``length`` segment: <64, 64-255, 256-1023, >=1024."""


def unit_id(key: str) -> int:
    """The 40-bit unit code of a routing key (``user:...``, ``session:...``, ``probe:...``)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"peftserve-unit").digest()
    return int.from_bytes(digest, "big") >> (64 - UNIT_BITS)


def stratum_of(weight: float) -> str:
    """The allocation stratum of a request routed at ``weight`` percent (0: the shadow phase)."""
    return SHADOW_STRATUM if weight <= 0 else f"{weight:g}%"


def length_bucket(prompt_tokens: int) -> str:
    """``length=<bucket>`` segment label of a prompt."""
    lo = 0
    for edge in LENGTH_EDGES:
        if prompt_tokens < edge:
            return f"length={lo}-{edge - 1}"
        lo = edge
    return f"length>={LENGTH_EDGES[-1]}"


def segment_labels(
    prompt_tokens: int | None,
    headers: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[str, ...]:
    """Segment labels of one request: its prompt-length bucket, the given header values
    (``header:<name>=<value>``) and every ``metadata`` entry (``meta:<key>=<value>``)."""
    labels: list[str] = []
    if prompt_tokens is not None:
        labels.append(length_bucket(prompt_tokens))
    for name, value in sorted((headers or {}).items()):
        labels.append(f"header:{name.lower()}={str(value).strip()[:64]}")
    for key, value in sorted((metadata or {}).items())[:MAX_METADATA]:
        labels.append(f"meta:{str(key)[:64]}={str(value)[:64]}")
    return tuple(labels)


@dataclass(slots=True)
class BatchShare:
    """What one request's engine steps were shared with, in the rollout's terms.

    Sums over the engine steps the request ran in: ``steps``; ``step_s`` their summed duration
    (seconds; the request's engine time, queueing excluded); ``tokens`` all tokens of those
    steps; and per kind of adapter (the rollout's stable version, its candidate, any other),
    the steps in which it had tokens (``*_steps``) and its tokens (``*_tokens``). The request's
    own adapter is present in all its steps. ``other_steps`` counts (step, other adapter) pairs.
    """

    steps: int
    step_s: float
    tokens: int
    stable_steps: int = 0
    stable_tokens: int = 0
    candidate_steps: int = 0
    candidate_tokens: int = 0
    other_steps: int = 0
    other_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchShare:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(slots=True)
class RequestRecord:
    """One answered (or failed) request of ``task@version``."""

    task: str
    version: str
    unit: int
    """:func:`unit_id` of the routing key: the unit of analysis."""
    stratum: str
    """Allocation it was routed under: ``"<weight>%"``, ``"shadow"`` or ``"probe"``."""
    at: float
    arm: str = ""
    """``stable`` or ``candidate`` of the task's rollout ("" outside a rollout)."""
    in_experiment: bool = True
    """Placed by the routing hash (or a probe / shadow copy): judged. Pins and overrides: shown only."""
    error: bool = False
    non_finite: bool = False
    """Non-finite logits; implies ``error``."""
    finish_reason: str | None = None
    e2e: float | None = None
    ttft: float | None = None
    tpot: float | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    segments: tuple[str, ...] = ()
    batch: BatchShare | None = None
    replica: str = ""
    """The engine replica that served it (groups the step-cost model)."""

    def __post_init__(self) -> None:
        self.error = bool(self.error or self.non_finite)
        for name in ("e2e", "ttft", "tpot"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(float(value)):
                setattr(self, name, None)  # a non-finite timing is never judged

    @property
    def completed(self) -> bool:
        """Finished without error and not aborted: its latency and length describe the version."""
        return not self.error and self.finish_reason != "abort"

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["segments"] = list(self.segments)
        d["batch"] = self.batch.to_dict() if self.batch is not None else None
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestRecord:
        d = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        d["segments"] = tuple(d.get("segments") or ())
        if d.get("batch") is not None:
            d["batch"] = BatchShare.from_dict(d["batch"])
        return cls(**d)


@dataclass(slots=True)
class ProbeRecord:
    """One answer of ``task@version`` to eval-set prompt ``prompt`` (its index in the set)."""

    task: str
    version: str
    prompt: int
    score: float | None
    """1.0 for an exact match, 0.0 otherwise; None for a latency-only probe (a repeat of a greedy
    prompt, or a prompt without an answer)."""
    at: float
    request: RequestRecord | None = field(default=None)
    """The probe as a request: its errors count beside user traffic (stratum ``probe``), its
    engine time per step (``request.batch``) is the fair latency measurement."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "version": self.version,
            "prompt": self.prompt,
            "score": self.score,
            "at": self.at,
            "request": self.request.to_dict() if self.request is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeRecord:
        request = data.get("request")
        score = data.get("score")
        return cls(
            data["task"],
            data["version"],
            int(data["prompt"]),
            float(score) if score is not None else None,
            float(data["at"]),
            RequestRecord.from_dict(request) if request is not None else None,
        )

    @property
    def step_time(self) -> float | None:
        """Mean engine seconds per step of the probe, or None without the engine's batch record."""
        b = self.request.batch if self.request is not None else None
        if b is None or b.steps <= 0 or not b.step_s > 0 or not math.isfinite(b.step_s):
            return None
        return b.step_s / b.steps
