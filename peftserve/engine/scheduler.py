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

A request with ``n`` choices is admitted with ``n`` seats of ``max_num_seqs`` and runs as one
sequence until the step that ends its prefill: there its other choices are forked off
(``SchedulerOutput.forks``): they share the prompt's KV blocks (the partly filled last one
copied) and draw their first token from the same logits row, then run on their own. When the
free blocks cannot hold the copies, the choices queue as sequences of their own instead
(``SchedulerOutput.spawned``), to be prefilled like any request.

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
from peftserve.engine.sequence import Sequence, SequenceStatus, choice_id

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
    forks: list[tuple[Sequence, list[Sequence]]] = field(default_factory=list)
    """(parent, its forked choices): the choices sample from the parent's row this step."""
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """(source, destination) KV blocks to copy once this step's forward wrote the source."""
    spawned: list[Sequence] = field(default_factory=list)
    """Choices queued as sequences of their own (no blocks for a fork)."""

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
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence, front: bool = False) -> None:
        self._arrivals += 1
        seq.arrival = self._arrivals
        seq.status = SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
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
        for _, children in out.forks:  # after the loops above: they run from the next step
            self.running.extend(children)
        for child in reversed(out.spawned):  # first in line, in order
            self._enqueue(child, front=True)
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
            self._run(seq, n, out)
            budget -= n
            i += 1
        return budget

    def _run(self, seq: Sequence, n: int, out: SchedulerOutput) -> None:
        """Put ``n`` tokens of ``seq`` in the step; fork its choices if they end its prefill."""
        out.seqs.append(seq)
        out.num_tokens.append(n)
        if seq.num_forks and seq.num_computed_tokens + n == seq.num_tokens:
            self._fork(seq, out)

    def _fork(self, parent: Sequence, out: SchedulerOutput) -> None:
        """Choices 1..n-1 of ``parent``'s request, sharing its prompt (see the module docstring)."""
        children = [
            Sequence(
                request_id=choice_id(parent.request, parent.index + k), token_ids=list(parent.token_ids),
                num_prompt_tokens=parent.num_prompt_tokens, params=parent.params, lora_id=parent.lora_id,
                slot=parent.slot, prompt_logprobs=parent.prompt_logprobs, group_id=parent.request,
                index=parent.index + k,
            )
            for k in range(1, parent.num_forks + 1)
        ]  # fmt: skip
        parent.num_forks = 0
        if not self.block_manager.can_fork(parent, len(children)):
            out.spawned.extend(children)
            return
        for child in children:
            copy = self.block_manager.fork(parent, child)
            if copy is not None:
                out.block_copies.append(copy)
            self._arrivals += 1
            child.arrival = self._arrivals
            child.num_computed_tokens = parent.num_tokens  # once this step has run
            child.status = SequenceStatus.RUNNING
            self._by_id[child.request_id] = child
        out.forks.append((parent, children))

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
        # a sequence with choices to fork holds their seats from its admission on
        seats = len(self.running) + sum(seq.num_forks for seq in self.running)
        seats += sum(len(children) for _, children in out.forks)
        i = 0
        while i < len(self.waiting) and budget > 0 and seats < self.config.max_num_seqs:
            seq = self.waiting[i]
            n = min(seq.num_uncomputed, budget)
            if seats + 1 + seq.num_forks > self.config.max_num_seqs or not bm.can_allocate(seq, n):
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
            seats += 1 + seq.num_forks
            self._run(seq, n, out)
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
