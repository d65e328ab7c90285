"""``MultiLoRALinear``: a base projection plus per-segment LoRA from a stacked slot pool."""

from __future__ import annotations

import torch
from torch import nn

from peftserve.lora.backend import LoRABackend
from peftserve.lora.metadata import LoRAStepMetadata


class LoRAStepContext:
    """What every wrapped layer reads during a step: the backend and the step's segments.

    One object is shared by all layers of a model and refilled in place once per step
    (``LoRAManager.prepare``); it is passed to the layers at injection, not held globally.
    """

    def __init__(self, backend: LoRABackend, meta: LoRAStepMetadata) -> None:
        self.backend = backend
        self.meta = meta


class MultiLoRALinear(nn.Module):
    """``y = base(x) + expand(shrink(x, A[slot]), B[slot])`` for each segment of tokens.

    ``lora_a`` [num_slots, r_max, in] and ``lora_b`` [num_slots, out, r_max] hold every
    resident adapter; slot 0 is "no adapter" and stays zero with rank 0.
    """

    def __init__(self, base_layer: nn.Linear, num_slots: int, max_rank: int, ctx: LoRAStepContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.ctx = ctx
        weight = base_layer.weight
        self.register_buffer(
            "lora_a", torch.zeros(num_slots, max_rank, self.in_features, dtype=weight.dtype, device=weight.device)
        )  # [S, r_max, in]
        self.register_buffer(
            "lora_b", torch.zeros(num_slots, self.out_features, max_rank, dtype=weight.dtype, device=weight.device)
        )  # [S, out, r_max]
        self.ranks = [0] * num_slots

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Write one adapter's A [r, in] and scaled B [out, r] into ``slot`` (None clears it)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is None or b is None:
            self.ranks[slot] = 0
            return
        rank = a.shape[0]
        self.lora_a[slot, :rank].copy_(a)
        self.lora_b[slot, :, :rank].copy_(b)
        self.ranks[slot] = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        meta = self.ctx.meta
        if meta.has_lora:
            x2 = x.reshape(-1, self.in_features)  # [T, in]
            out2 = out.view(-1, self.out_features)  # [T, out]
            self.ctx.backend.add_lora(x2, out2, self.lora_a, self.lora_b, self.ranks, meta)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={len(self.ranks)}"
