"""The Triton LoRA backend: every slice of a projection group in one set of launches.

Computes exactly what ``TorchBackend.add_lora`` computes (see ``peftserve.lora.backend``).
Steps of up to ``FUSED_MAX_TOKENS`` tokens (decode) take one launch that keeps the fp32
``x @ A^T`` on chip (``lora_shrink_expand``); longer ones take the segmented shrink then
expand, with an fp32 intermediate in a buffer allocated once. Either way the launch grid
depends only on the token count and the size of the metadata buffers, so a call can be
captured in a CUDA graph once the shape has been run eagerly (the two-launch kernels
autotune on first use of a shape). Runs on CPU tensors under ``TRITON_INTERPRET=1``.

Operands are validated when a stack is built and when a step's metadata is first seen,
not on every launch; the device ranks are the stack's view of the ``LoRAManager``'s rank
table, refreshed at adapter load and unload.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from peftserve import kernels
from peftserve.kernels._segments import INTERPRETING, MAX_SLICES
from peftserve.kernels.lora_fused import FUSED_MAX_TOKENS
from peftserve.lora.metadata import LoRAStepMetadata

if TYPE_CHECKING:
    from peftserve.lora.layers import LoRAStack

logger = logging.getLogger(__name__)

# Split-K of the shrink by token count: small batches have few tiles, so the input features
# are split across more programs (each writes a partial sum; the expand adds them).
# It depends on the token count only, so a captured CUDA graph stays valid.
SPLIT_BOUNDS = (64, 1024)  # T <= 64: 8 ways, T <= 1024: 4 ways, else 1
FUSED_MAX_RANK = 128  # the fused launch keeps a [16, rank] fp32 tile in registers


def split_k(num_tokens: int) -> int:
    """How many ways the shrink splits its input features for a step of ``num_tokens`` (1 in
    Triton's interpreter, where more programs only cost time; the kernel tests cover splits)."""
    if INTERPRETING:
        return 1
    return 8 if num_tokens <= SPLIT_BOUNDS[0] else 4 if num_tokens <= SPLIT_BOUNDS[1] else 1


class TritonBackend:
    """LoRA through ``peftserve.kernels``: one fused launch for decode sizes, else two."""

    name = "triton"

    def __init__(self, fused_max_tokens: int = FUSED_MAX_TOKENS) -> None:
        self.fused_max_tokens = fused_max_tokens
        """Steps up to this many tokens take the single fused launch (0: never)."""
        # fp32 x·A intermediates [NS, split, T, r_max], one flat buffer per (device, max_tokens,
        # r_max), reused by every call.
        self._intermediates: dict[tuple[torch.device, int, int], torch.Tensor] = {}
        self._checked: LoRAStepMetadata | None = None

    def add_lora(
        self,
        x: torch.Tensor,  # [T, in]
        out: torch.Tensor,  # [T, N], updated in place
        stack: LoRAStack,
        meta: LoRAStepMetadata,
    ) -> None:
        if not meta.has_lora:
            return
        if meta is not self._checked:
            _check_metadata(meta, x.device)
            self._checked = meta
        num_tokens = x.shape[0]
        segs = (meta.seg_start, meta.seg_len, meta.seg_slot)
        r_max = stack.max_rank
        if num_tokens <= self.fused_max_tokens and r_max <= FUSED_MAX_RANK:
            kernels.lora_shrink_expand(
                x,
                stack.lora_a,
                stack.lora_b,
                stack.slot_ranks,
                *segs,
                out,
                slices=stack.slices,
                check=False,
            )
            return
        split = split_k(num_tokens)
        y = self._intermediate(x.device, max(meta.max_tokens, num_tokens), r_max)
        y = y[: stack.num_slices * split * num_tokens * r_max].view(
            stack.num_slices, split, num_tokens, r_max
        )
        kernels.lora_shrink(x, stack.lora_a, stack.slot_ranks, *segs, y, check=False)  # partials
        kernels.lora_expand(
            y, stack.lora_b, stack.slot_ranks, *segs, out, slices=stack.slices, check=False
        )

    def _intermediate(self, device: torch.device, max_tokens: int, r_max: int) -> torch.Tensor:
        """Flat fp32 buffer that holds ``[NS, split_k(T), T, r_max]`` for every T <= max_tokens."""
        key = (device, max_tokens, r_max)
        buf = self._intermediates.get(key)
        if buf is None:
            rows = max(
                split_k(t) * t for t in {min(max_tokens, b) for b in SPLIT_BOUNDS} | {max_tokens}
            )
            buf = torch.empty(MAX_SLICES * rows * r_max, dtype=torch.float32, device=device)
            self._intermediates[key] = buf
            logger.debug(
                "LoRA intermediate: %d x %d x %d fp32 on %s", MAX_SLICES, rows, r_max, device
            )
        return buf


def _check_metadata(meta: LoRAStepMetadata, device: torch.device) -> None:
    """The segment buffers the kernels read (once per metadata object: their dtype, layout
    and size never change; their contents are checked by ``LoRAStepMetadata.prepare``)."""
    from peftserve.kernels._segments import MAX_SEGMENTS

    for name in ("seg_start", "seg_len", "seg_slot"):
        t = getattr(meta, name)
        if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous() or t.device != device:
            raise ValueError(
                f"LoRA metadata {name} must be a contiguous 1-d int32 tensor on {device}"
            )
    if meta.seg_start.numel() > MAX_SEGMENTS:
        raise ValueError(
            f"{meta.seg_start.numel()} segment slots, more than the kernels' {MAX_SEGMENTS}:"
            " size the step metadata by the scheduler's max_num_seqs"
        )
