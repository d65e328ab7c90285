"""The Triton LoRA backend: segmented-gather shrink then expand, two launches per call.

Computes exactly what ``TorchBackend.add_lora`` computes (see ``peftserve.lora.backend``).
The launch grid depends only on the token count and the size of the metadata buffers, so
a call can be captured in a CUDA graph once the shape has been run eagerly (the kernels
autotune on first use of a shape). Runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from peftserve import kernels
from peftserve.lora.metadata import LoRAStepMetadata

logger = logging.getLogger(__name__)

# Split-K of the shrink by token count: small batches have few tiles, so the input features
# are split across more programs (each writes a partial sum; the expand adds them).
# It depends on the token count only, so a captured CUDA graph stays valid.
SPLIT_BOUNDS = (64, 1024)  # T <= 64: 8 ways, T <= 1024: 4 ways, else 1


def split_k(num_tokens: int) -> int:
    """How many ways the shrink splits its input features for a step of ``num_tokens``."""
    return 8 if num_tokens <= SPLIT_BOUNDS[0] else 4 if num_tokens <= SPLIT_BOUNDS[1] else 1


class TritonBackend:
    """LoRA through ``peftserve.kernels.lora_shrink`` / ``lora_expand``."""

    name = "triton"

    def __init__(self) -> None:
        # fp32 x·A intermediates (split-K partials), one per (device, max_tokens, r_max),
        # reused by every call.
        self._intermediates: dict[tuple[torch.device, int, int], torch.Tensor] = {}
        # Device copies of host rank lists, keyed by the list's identity; each entry keeps the
        # list alive (so its id stays unique), its last-seen contents and the device tensor,
        # which is updated in place so its address never changes.
        self._ranks: dict[tuple[int, torch.device], tuple[Sequence[int], list[int], torch.Tensor]] = {}

    def add_lora(
        self,
        x: torch.Tensor,  # [T, in]
        out: torch.Tensor,  # [T, out], updated in place
        lora_a: torch.Tensor,  # [num_slots, r_max, in]
        lora_b: torch.Tensor,  # [num_slots, out, r_max], scaling folded in
        ranks: Sequence[int],  # true rank per slot (host), 0 for empty slots
        meta: LoRAStepMetadata,
    ) -> None:
        if not meta.has_lora:
            return
        num_tokens = x.shape[0]
        split = split_k(num_tokens)
        y = self._intermediate(x.device, max(meta.max_tokens, num_tokens), lora_a.shape[1])
        y = y[: split * num_tokens * lora_a.shape[1]].view(split, num_tokens, lora_a.shape[1])
        slot_ranks = self._slot_ranks(ranks, x.device)  # [num_slots] int32
        segs = (meta.seg_start, meta.seg_len, meta.seg_slot)
        kernels.lora_shrink(x, lora_a, slot_ranks, *segs, y)  # y: [split, T, r_max] partials
        kernels.lora_expand(y, lora_b, slot_ranks, *segs, out)

    def _intermediate(self, device: torch.device, max_tokens: int, r_max: int) -> torch.Tensor:
        """Flat fp32 buffer that holds ``[split_k(T), T, r_max]`` for every T <= max_tokens."""
        key = (device, max_tokens, r_max)
        buf = self._intermediates.get(key)
        if buf is None:
            rows = max(split_k(t) * t for t in {min(max_tokens, b) for b in SPLIT_BOUNDS} | {max_tokens})
            buf = torch.empty(rows * r_max, dtype=torch.float32, device=device)
            self._intermediates[key] = buf
            logger.debug("LoRA intermediate: %d x %d fp32 on %s", rows, r_max, device)
        return buf

    def _slot_ranks(self, ranks: Sequence[int], device: torch.device) -> torch.Tensor:
        entry = self._ranks.get((id(ranks), device))
        if entry is not None:
            _, seen, dev = entry
            if seen != ranks and seen != list(ranks):  # first test is enough for a list
                if len(ranks) != len(seen):
                    raise ValueError(f"rank list changed length from {len(seen)} to {len(ranks)}")
                dev.copy_(torch.tensor(ranks, dtype=torch.int32))
                seen[:] = ranks
            return dev
        dev = torch.tensor(ranks, dtype=torch.int32).to(device)  # [num_slots]
        self._ranks[(id(ranks), device)] = (ranks, list(ranks), dev)
        return dev
