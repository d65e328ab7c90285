"""What the engine streams back for each request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None
    """None only for a prompt's first token (nothing comes before it)."""
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


@dataclass(slots=True)
class StepRecord:
    """One engine step as the requests in it saw it: duration, tokens, tokens per adapter."""

    seconds: float
    tokens: int
    adapters: dict[str | None, int]


def step_share(records: list[StepRecord]) -> StepShare:
    """Sum a finished request's step records (once per request). ``records`` is the engine's
    list for the request (``Sequence.steps``), which the engine thread may still append to
    until the request is stopped there: a snapshot is summed."""
    records = list(records)
    share = StepShare(steps=len(records))
    for record in records:
        share.step_s += record.seconds
        share.tokens += record.tokens
        for lora_id, n in record.adapters.items():
            cell = share.adapters.setdefault(lora_id, [0, 0])
            cell[0] += 1
            cell[1] += n
    return share


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
    """With ``SamplingParams.score_from`` or ``prompt_logprobs``: the log-probability of each
    prompt token from that index on (the second token for ``prompt_logprobs``), on the output
    holding the first generated token (or on the last one, if it ended without a token)."""
    index: int = 0
    """The choice this output belongs to (``SamplingParams.n`` > 1); ``finished`` ends that
    choice, and the request ends when all of its choices have."""
    prompt_token_logprobs: list[TokenLogprob] | None = None
    """With ``SamplingParams.prompt_logprobs``: every prompt token with its text, its
    log-probability and top-k alternatives (the first token's logprob is None), on the output
    holding the first generated token."""
    batch: StepShare | None = None
    """On the last output: what the request's engine steps were shared with (choice 0's only,
    for a request with several choices)."""
    served_by: str = ""
    """The engine replica that produced it (Ray Serve composition); empty in one process."""


RawLogprob = tuple[float, list[int], list[float]]
"""(logprob of the sampled token, top-k token ids, their logprobs), before detokenization."""


@dataclass(slots=True)
class TokenOutput:
    """What the step loop produces for one request: token ids, never text.

    ``peftserve.engine.output_processor.OutputProcessor`` turns a stream of these into
    ``RequestOutput``s (detokenization, stop strings, logprob texts), off the engine thread.
    """

    request_id: str
    token_ids: list[int]
    """Tokens generated since the previous output (empty for a finish without a token)."""
    finish_reason: str | None = None
    """Set when the engine ended the request: 'stop' (EOS), 'length', 'abort' or 'error'."""
    error: str | None = None
    logprobs: list[RawLogprob] | None = None
    """One entry per token of ``token_ids`` when the request asked for logprobs."""
    prompt_logprobs: list[RawLogprob] | None = None
    """With ``SamplingParams.scored_from``: on the output of the first generated token (or the
    final one of a request that ended without a token)."""
