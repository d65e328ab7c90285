"""``Sequence``: the one object passed between scheduler, block manager, runner and sampler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peftserve.engine.outputs import RawLogprob
from peftserve.engine.sampling_params import SamplingParams


def choice_id(request_id: str, index: int) -> str:
    """The engine's id of choice ``index`` of a request (``n > 1``): the request's own id for
    choice 0, ``request_id#index`` for the others."""
    return request_id if index == 0 else f"{request_id}#{index}"


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One choice of a request: its tokens (prompt, then generated) and KV blocks (no text:
    see ``peftserve.engine.output_processor``). A request with ``n`` choices starts as one
    sequence, choice 0, which forks the other ``n - 1`` when its prefill ends
    (``num_forks``); ``request_id`` is then ``choice_id(group_id, index)``.

    ``num_computed_tokens`` counts the tokens whose keys and values are in the KV cache;
    the tokens after it are what the next steps must run (a prefill chunk, or the one
    token sampled last). Preemption by recompute resets it to 0 and keeps the tokens.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    lora_id: str | None = None
    slot: int = 0
    """LoRA slot (0 = base model); given at admission, valid while running."""
    arrival: int = 0
    """Admission order; the scheduler serves in this order."""
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_slot_waits: int = 0
    """Steps this sequence was passed over because its adapter had no free slot."""
    num_preemptions: int = 0
    """Times it was preempted (its blocks freed, to be recomputed)."""
    prompt_logprobs: dict[int, RawLogprob] = field(default_factory=dict)
    """Teacher-forced log-probability of prompt token i (i >= params.scored_from), with its
    top-k alternatives if asked for; forked choices share their parent's."""
    group_id: str = ""
    """The request's id (its choices share it); ``request_id`` when empty."""
    index: int = 0
    """Which choice of its request this sequence is."""
    num_forks: int = 0
    """Choices still to fork off this one when its prefill ends (``n - 1`` on choice 0)."""
    finish_reason: str | None = None
    error: str | None = None
    steps: list = field(default_factory=list)
    """The ``StepRecord`` of every engine step this sequence ran in (shared objects, one per step)."""

    @property
    def request(self) -> str:
        """The id of the request this choice belongs to."""
        return self.group_id or self.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose KV is not in the cache yet."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
