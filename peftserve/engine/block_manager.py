"""Paged KV-cache blocks: a free list and each sequence's block table.

The cache holds ``RESERVED_BLOCKS`` more blocks than are handed out: block ``PAD_BLOCK``
stays zero and pads block tables (padding with a live block could read its NaN under a
mask), block ``SCRATCH_BLOCK`` takes the K/V writes of padding rows and is never read.
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
        """Return all of ``seq``'s blocks."""
        self._free.extend(reversed(seq.block_table))
        seq.block_table.clear()
