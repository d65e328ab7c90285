"""Paged KV-cache blocks: a free list and each sequence's block table.

The cache holds ``RESERVED_BLOCKS`` more blocks than are handed out: block ``PAD_BLOCK``
stays zero and pads block tables (padding with a live block could read its NaN under a
mask), block ``SCRATCH_BLOCK`` takes the K/V writes of padding rows and is never read.

A sequence forked off another (the choices of an ``n > 1`` request, after the prompt's
prefill) shares its full blocks, counted in ``_shared``; a block returns to the free list when
its last holder frees it. Nobody writes a shared block again: the positions it covers are
computed. The last, partly filled block is copied instead (``fork`` returns the copy to make).
"""

from __future__ import annotations

from peftserve.engine.sequence import Sequence

PAD_BLOCK = 0
SCRATCH_BLOCK = 1
RESERVED_BLOCKS = 2
"""Blocks 0 .. RESERVED_BLOCKS - 1 are never handed out to sequences."""


class BlockManager:
    """Hands out fixed-size KV blocks; a sequence holds ``ceil(tokens / block_size)`` of them.

    ``num_blocks`` blocks are handed out, with ids ``RESERVED_BLOCKS .. RESERVED_BLOCKS +
    num_blocks - 1`` (the cache holds ``num_blocks + RESERVED_BLOCKS`` blocks).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # pop() hands out low ids first
        self._free = list(range(num_blocks + RESERVED_BLOCKS - 1, RESERVED_BLOCKS - 1, -1))
        self._fresh: list[int] = []
        self._shared: dict[int, int] = {}
        """Block -> its holders, for blocks held by more than one sequence."""

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks ``seq`` needs so that its table covers ``num_tokens`` tokens."""
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Append blocks to ``seq.block_table`` until it covers ``num_tokens`` tokens."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"{seq.request_id}: needs {need} KV blocks, {len(self._free)} free")
        for _ in range(need):
            seq.block_table.append(self._free.pop())
            self._fresh.append(seq.block_table[-1])

    def take_fresh(self) -> list[int]:
        """Blocks handed out since the last call: the runner zeroes them before use, so no
        stale (possibly non-finite) values of a previous owner sit under an attention mask."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def free(self, seq: Sequence) -> None:
        """Return all of ``seq``'s blocks (a shared one once its last holder lets it go)."""
        shared = self._shared
        for block in reversed(seq.block_table):
            holders = shared.get(block)
            if holders is None:
                self._free.append(block)
            elif holders == 2:
                del shared[block]
            else:
                shared[block] = holders - 1
        seq.block_table.clear()

    def can_fork(self, parent: Sequence, num_children: int) -> bool:
        """Whether ``num_children`` forks of ``parent`` get their copies of its last block."""
        return self._partial(parent) * num_children <= len(self._free)

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give ``child`` the table of ``parent`` (whose blocks cover its tokens): the full
        blocks shared, a partly filled last block as a fresh one. Returns (parent's block,
        child's block) to copy once the parent's K/V is written there, or None."""
        if child.block_table:
            raise RuntimeError(f"{child.request_id}: a forked sequence starts without blocks")
        table = parent.block_table
        full = len(table) - self._partial(parent)
        for block in table[:full]:
            self._shared[block] = self._shared.get(block, 1) + 1
        child.block_table.extend(table[:full])
        if full == len(table):
            return None
        self.allocate(child, parent.num_tokens)
        return table[-1], child.block_table[-1]

    def _partial(self, seq: Sequence) -> int:
        """1 if ``seq``'s last block is partly filled by its tokens, else 0."""
        return int(seq.num_tokens % self.block_size != 0 and bool(seq.block_table))

    def exclusive_blocks(self, seq: Sequence) -> list[int]:
        """Blocks of ``seq`` no other sequence holds."""
        return [block for block in seq.block_table if block not in self._shared]
