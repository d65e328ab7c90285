"""The LoRA-wrapped projections: single ones and groups of siblings that share an input.

``LoRAStack`` holds the stacked adapter weights of one projection or of a group of
sibling projections (q/k/v, gate/up) whose outputs are *slices* of one output:
``lora_a`` [num_slots, NS, r_max, in] (each slice's A) and ``lora_b`` [num_slots, N, r_max]
(the slices' B side by side along the output features), with the true rank of every
(slot, slice). Slot 0 is "no adapter" and stays zero with rank 0; unused rank rows stay zero.

``MultiLoRALinear`` wraps one ``nn.Linear`` (also Phi-3's already-fused ``qkv_proj`` and
``gate_up_proj``, which PEFT adapters target whole). ``ProjectionGroup`` serves the
members of a sibling group (``GroupedLoRALinear``): the first member called runs one GEMM
over the concatenated base weights and the group's LoRA as one set of launches for all
slices, writing into that one output; every member returns its slice (a view), so the
model code, which calls ``q_proj(h)``, ``k_proj(h)`` and ``v_proj(h)`` in turn, is untouched.
The members' own ``nn.Linear`` weights become views into the concatenated weight (no copy
kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftserve.lora.backend import LoRABackend
from peftserve.lora.metadata import LoRAStepMetadata

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling projections of one block that read the same input, grouped when all present."""


class LoRAStepContext:
    """What every wrapped layer reads during a step: the backend and the step's segments.

    One object is shared by all layers of a model and refilled in place once per step
    (``LoRAManager.prepare``); it is passed to the layers at injection, not held globally.
    """

    def __init__(self, backend: LoRABackend, meta: LoRAStepMetadata) -> None:
        self.backend = backend
        self.meta = meta


class LoRAStack:
    """Adapter slots of one projection (one slice) or of a sibling group (one slice each)."""

    def __init__(
        self, in_features: int, slices: tuple[int, ...], num_slots: int, max_rank: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:  # fmt: skip
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"LoRA slots need a float dtype, not {dtype}")
        self.in_features = in_features
        self.slices = slices
        self.offsets = tuple(sum(slices[:i]) for i in range(len(slices) + 1))  # [NS + 1]
        self.out_features = self.offsets[-1]
        self.max_rank = max_rank
        self.lora_a = torch.zeros(
            num_slots, len(slices), max_rank, in_features, dtype=dtype, device=device
        )
        self.lora_b = torch.zeros(
            num_slots, self.out_features, max_rank, dtype=dtype, device=device
        )
        self.ranks: list[list[int]] = [[0] * num_slots for _ in slices]  # [NS][num_slots] host
        self.slot_ranks = torch.zeros(num_slots, len(slices), dtype=torch.int32, device=device)
        """[num_slots, NS] device copy of ``ranks``; ``LoRAManager`` rebinds it to a view of
        its one rank table and refreshes that table after every load and unload."""

    @property
    def num_slices(self) -> int:
        return len(self.slices)

    def set_slot(
        self, slot: int, index: int, a: torch.Tensor | None, b: torch.Tensor | None
    ) -> None:
        """Write one adapter's A [r, in] and scaled B [out_index, r] into slice ``index`` of
        ``slot`` (None clears it). The device rank table is refreshed by the manager."""
        cols = slice(self.offsets[index], self.offsets[index + 1])
        self.lora_a[slot, index].zero_()
        self.lora_b[slot, cols].zero_()
        if a is None or b is None:
            self.ranks[index][slot] = 0
            return
        rank = a.shape[0]
        self.lora_a[slot, index, :rank].copy_(a)
        self.lora_b[slot, cols, :rank].copy_(b)
        self.ranks[index][slot] = rank

    def add_lora(self, ctx: LoRAStepContext, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out += LoRA(x)`` for the step's segments; x [..., in], out [..., out_features]."""
        if ctx.meta.has_lora:
            x2 = x.reshape(-1, self.in_features)  # [T, in]
            out2 = out.view(-1, self.out_features)  # [T, N]
            ctx.backend.add_lora(x2, out2, self, ctx.meta)


class MultiLoRALinear(nn.Module):
    """``y = base(x) + expand(shrink(x, A[slot]), B[slot])`` for each segment of tokens."""

    def __init__(
        self, base_layer: nn.Linear, num_slots: int, max_rank: int, ctx: LoRAStepContext
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.ctx = ctx
        weight = base_layer.weight
        self.stack = LoRAStack(
            self.in_features, (self.out_features,), num_slots, max_rank, weight.dtype, weight.device
        )

    @property
    def lora_a(self) -> torch.Tensor:
        return self.stack.lora_a[:, 0]  # [num_slots, r_max, in]

    @property
    def lora_b(self) -> torch.Tensor:
        return self.stack.lora_b  # [num_slots, out, r_max]

    @property
    def ranks(self) -> list[int]:
        return self.stack.ranks[0]

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Write one adapter's A [r, in] and scaled B [out, r] into ``slot`` (None clears it)."""
        self.stack.set_slot(slot, 0, a, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        self.stack.add_lora(self.ctx, x, out)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={len(self.ranks)}"


class ProjectionGroup:
    """Sibling projections of one input (q/k/v or gate/up) computed together.

    One GEMM over the concatenated weights ``[N, in]`` and one LoRA call for all slices
    (``LoRAStack`` with one slice per member) produce the group's output ``[..., N]``; each
    member takes its slice. The output is computed when a member is called with an input
    the group has not served yet to that member, so any call order, or a member called
    alone, stays correct; it is dropped once every member has taken its slice.
    """

    def __init__(
        self, linears: list[nn.Linear], num_slots: int, max_rank: int, ctx: LoRAStepContext
    ) -> None:
        first = linears[0]
        with torch.no_grad():
            self.weight = torch.cat([lin.weight for lin in linears])  # [N, in]
            has_bias = first.bias is not None
            self.bias = torch.cat([lin.bias for lin in linears]) if has_bias else None  # [N]
            offset = 0
            for lin in linears:  # the members' weights become views: no second copy
                n = lin.out_features
                lin.weight = nn.Parameter(self.weight[offset : offset + n], requires_grad=False)
                if has_bias:
                    lin.bias = nn.Parameter(self.bias[offset : offset + n], requires_grad=False)
                offset += n
        slices = tuple(lin.out_features for lin in linears)
        self.stack = LoRAStack(
            first.in_features, slices, num_slots, max_rank, first.weight.dtype, first.weight.device
        )
        self.ctx = ctx
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._pending: set[int] = set()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s output for ``x``: ``[..., slices[index]]`` (a view)."""
        if x is not self._input or index not in self._pending:
            out = F.linear(x, self.weight, self.bias)  # [..., N]
            self.stack.add_lora(self.ctx, x, out)
            self._input, self._output = x, out
            self._pending = set(range(self.stack.num_slices))
        out = self._output
        self._pending.discard(index)
        if not self._pending:  # every member served: let the step's tensors go
            self._input = self._output = None
        return out[..., self.stack.offsets[index] : self.stack.offsets[index + 1]]


class GroupedLoRALinear(nn.Module):
    """One member of a ``ProjectionGroup``: returns its slice of the group's output."""

    def __init__(self, base_layer: nn.Linear, group: ProjectionGroup, index: int) -> None:
        super().__init__()
        self.base_layer = base_layer  # its weight is a view into the group's
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.index = index
        object.__setattr__(self, "group", group)  # shared by the members; not a submodule

    @property
    def stack(self) -> LoRAStack:
        return self.group.stack

    @property
    def lora_a(self) -> torch.Tensor:
        return self.stack.lora_a[:, self.index]  # [num_slots, r_max, in]

    @property
    def lora_b(self) -> torch.Tensor:
        lo, hi = self.stack.offsets[self.index], self.stack.offsets[self.index + 1]
        return self.stack.lora_b[:, lo:hi]  # [num_slots, out, r_max]

    @property
    def ranks(self) -> list[int]:
        return self.stack.ranks[self.index]

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Write one adapter's A [r, in] and scaled B [out, r] into ``slot`` (None clears it)."""
        self.stack.set_slot(slot, self.index, a, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slice {self.index} of {self.stack.slices}"
