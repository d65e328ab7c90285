"""Continuous batching: which sequences run in the next step, and how many tokens each.

Policy, once per step:

1. Running sequences first, oldest first: each gets its remaining tokens (one for a
   decode, the rest of its prompt for a prefill) up to the step's token budget. When the
   KV cache has no block left for one, the newest running sequence is preempted by
   recompute: its blocks are freed and it goes back to the front of the waiting queue
   with all its tokens (prompt and generated), to be prefilled again later.
2. Then waiting sequences, in order, while the budget, ``max_num_seqs`` and the free
   blocks allow (not in a step that had to preempt). A long prompt is admitted with a
   chunk and finishes its prefill over the next steps (chunked prefill).
3. The step's sequences are ordered by LoRA slot, so tokens sharing an adapter are
   contiguous in the packed batch.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from peftserve.config import SchedulerConfig
from peftserve.engine.block_manager import BlockManager
from peftserve.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    """One step: ``seqs[i]`` runs ``num_tokens[i]`` tokens from its ``num_computed_tokens``."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Owns the waiting queue and the running set; see the module docstring for the policy."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._arrivals = 0

    @property
    def num_unfinished(self) -> int:
        return len(self._by_id)

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (capacity is the engine's check)."""
        self._arrivals += 1
        seq.arrival = self._arrivals
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._by_id[seq.request_id] = seq

    def finish(self, seq: Sequence) -> None:
        """Take ``seq`` out (finished or aborted) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)
        self._by_id.pop(seq.request_id, None)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.num_preempted:
            self._schedule_waiting(out, budget)
        order = sorted(range(len(out.seqs)), key=lambda i: out.seqs[i].slot)  # stable
        out.seqs = [out.seqs[i] for i in order]
        out.num_tokens = [out.num_tokens[i] for i in order]
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, seq.num_computed_tokens + n, out):
                break  # seq itself was preempted: it was the last one
            out.seqs.append(seq)
            out.num_tokens.append(n)
            budget -= n
            i += 1
        return budget

    def _reserve(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Make room for ``seq`` by preempting the newest running sequences; False if it was one."""
        bm = self.block_manager
        while not bm.can_allocate(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            out.num_preempted += 1
            if victim is seq:
                return False
        bm.allocate(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.pop()
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        logger.debug("preempted %s (%d tokens)", seq.request_id, seq.num_tokens)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not bm.can_allocate(seq, n):
                break
            self.waiting.popleft()
            bm.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_tokens.append(n)
            budget -= n
