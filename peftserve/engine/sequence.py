"""``Sequence``: the one object passed between scheduler, block manager, runner and sampler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from peftserve.engine.outputs import TokenLogprob
from peftserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One request: its tokens (prompt, then generated), KV blocks and output bookkeeping.

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
    generator: torch.Generator | None = None
    """Per-request generator for seeded sampling (None: the engine's shared one)."""
    # Output bookkeeping (engine/detokenizer).
    output_text: str = ""
    """Generated text so far, stop string cut."""
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: dict[int, float] = field(default_factory=dict)
    """Teacher-forced log-probability of prompt token i (i >= params.score_from)."""
    finish_reason: str | None = None
    error: str | None = None
    steps: list = field(default_factory=list)
    """The ``StepRecord`` of every engine step this sequence ran in (shared objects, one per step)."""

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
