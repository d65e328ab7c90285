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
   A sequence is admitted only with its adapter in a slot: resident already, or made
   resident now in a free slot or in place of an idle adapter (one no running sequence
   uses). One whose adapter cannot have a slot yet (all slots busy, or still loading from
   disk) is passed over and the sequences behind it may go first; once it has been passed
   over ``MAX_SLOT_WAIT_STEPS`` times for want of a slot, nobody behind it is admitted
   until it is, so the running adapters drain and one of their slots frees up.
3. The step's sequences are ordered by LoRA slot, so tokens sharing an adapter are
   contiguous in the packed batch.

A step thus never holds more distinct adapters than there are slots, and an adapter with
running sequences is never evicted. Preempted sequences go through the same admission.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from peftserve.config import SchedulerConfig
from peftserve.engine.block_manager import BlockManager
from peftserve.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

MAX_SLOT_WAIT_STEPS = 32
"""Steps a waiting sequence may be passed over for want of an adapter slot before it blocks
the sequences behind it (bounds the unfairness of letting resident adapters go first)."""


class AdapterSlots(Protocol):
    """What the scheduler asks of the adapter tiers (``peftserve.lora.cache.AdapterTiers``)."""

    def acquire(self, lora_id: str, busy: set[str]) -> int | None:
        """The adapter's slot, made resident now if possible (evicting no adapter in
        ``busy``); None if it must wait."""
        ...

    def waits_for_slot(self, lora_id: str) -> bool:
        """After ``acquire`` answered None: True when the reason is that no slot can be had."""
        ...


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

    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, adapters: AdapterSlots | None = None
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.adapters = adapters
        """None: every sequence keeps the slot it was given (unit tests)."""
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
        seq.num_preemptions += 1
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        logger.debug("preempted %s (%d tokens)", seq.request_id, seq.num_tokens)

    def busy_adapters(self) -> set[str]:
        """Adapters of the running sequences: none of them may be evicted."""
        return {seq.lora_id for seq in self.running if seq.lora_id is not None}

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        busy = self.busy_adapters()
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[i]
            n = min(seq.num_uncomputed, budget)
            if not bm.can_allocate(seq, n):
                break
            if not self._bind_adapter(seq, busy):
                if self._starving(seq):
                    break  # it has waited long enough for a slot: nobody overtakes it any more
                i += 1
                continue
            del self.waiting[i]
            bm.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_tokens.append(n)
            budget -= n

    def _starving(self, seq: Sequence) -> bool:
        return seq.num_slot_waits >= MAX_SLOT_WAIT_STEPS

    def _bind_adapter(self, seq: Sequence, busy: set[str]) -> bool:
        """Give ``seq`` its adapter's slot (loading it now if it can); False if it must wait."""
        if seq.lora_id is None or self.adapters is None:
            return True
        slot = self.adapters.acquire(seq.lora_id, busy)
        if slot is None:
            seq.num_slot_waits += self.adapters.waits_for_slot(seq.lora_id)
            return False
        seq.slot = slot
        busy.add(seq.lora_id)
        return True
