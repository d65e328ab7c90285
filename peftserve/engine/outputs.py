"""What the engine streams back for each request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)
    """The requested top-k alternatives (token text -> logprob)."""


@dataclass(slots=True)
class StepShare:
    """What one request's engine steps were shared with (on its last output).

    Sums over the steps the request ran in: ``steps``, ``step_s`` (their wall time: the
    request's engine time, queueing excluded), ``tokens`` (all tokens of those steps) and, per
    adapter id (None: the base model), ``[steps with tokens of it, its tokens]``. A canary judge
    reads it to compare versions at equal batch composition; the request's own adapter is
    present in all its steps.
    """

    steps: int = 0
    step_s: float = 0.0
    tokens: int = 0
    adapters: dict[str | None, list[int]] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """One increment of a request's output; the last one has ``finished`` set."""

    request_id: str
    text: str
    """New text since the previous increment (stop strings already cut)."""
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    """'stop' (EOS or a stop string), 'length' (max_tokens or context), 'abort' or 'error'."""
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    prompt_logprobs: list[float] | None = None
    """With ``SamplingParams.score_from``: the log-probability of each prompt token from that
    index on, on the last output."""
    batch: StepShare | None = None
    """On the last output: what the request's engine steps were shared with."""
