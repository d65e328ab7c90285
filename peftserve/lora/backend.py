"""LoRA compute backends behind one small interface, and the selector.

Semantics of ``add_lora`` (what every backend computes, written as plain torch), for a
``LoRAStack`` with slices ``s`` (one for a single projection; q/k/v or gate/up side by side
for a group) whose output columns are ``cols_s``::

    for start, length, slot in segments:          # slot 0 = no adapter: skipped
        if slot == 0: continue
        xs = x[start:start+length]                                        # [n, in]
        for s in slices:
            r = stack.ranks[s][slot]                                      # 0: not targeted
            y = xs.float() @ stack.lora_a[slot, s, :r].float().T          # [n, r] fp32 (shrink)
            out[start:start+length, cols_s] += (y @ stack.lora_b[slot, cols_s, :r].float().T).to(out.dtype)

Rows of ``out`` outside the adapter segments are left untouched.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import torch

from peftserve.lora.metadata import LoRAStepMetadata

if TYPE_CHECKING:
    from peftserve.lora.layers import LoRAStack

logger = logging.getLogger(__name__)


class LoRABackend(Protocol):
    """What the wrapped layers call once per forward (per group of sliced projections)."""

    name: str

    def add_lora(
        self,
        x: torch.Tensor,  # [T, in]
        out: torch.Tensor,  # [T, N], updated in place
        stack: LoRAStack,  # the adapter slots, with their host and device ranks
        meta: LoRAStepMetadata,
    ) -> None: ...


class TorchBackend:
    """Plain-torch reference: the CPU path and the test oracle for the kernels.

    Long segments (prefill chunks) run as one shrink for all slices and one expand per
    slice. Short segments (decode tokens grouped by adapter) are padded to a common length
    and run as one batched shrink over all of them and one batched expand per slice: a
    decode step then costs a handful of ops per layer however many adapters it holds.
    """

    name = "torch"
    short_segment = 32
    """Segments up to this many tokens go through the batched path."""

    def __init__(self) -> None:
        self._plan_meta: LoRAStepMetadata | None = None
        self._plan_step = -1
        self._plan: _BatchedPlan | None = None
        self._long: list[tuple[int, int, int]] = []

    def add_lora(self, x, out, stack, meta) -> None:
        self._make_plan(meta, x.device)
        offsets = stack.offsets
        for start, length, slot in self._long:
            ranks = [stack.ranks[s][slot] for s in range(stack.num_slices)]
            r = max(ranks)
            if r == 0:
                continue
            rows = slice(start, start + length)
            y = torch.matmul(
                x[rows].float(), stack.lora_a[slot, :, :r].float().transpose(1, 2)
            )  # [NS, n, r]
            for s, rs in enumerate(ranks):
                if rs:
                    cols = slice(offsets[s], offsets[s + 1])
                    delta = y[s, :, :rs] @ stack.lora_b[slot, cols, :rs].float().T  # [n, N_s] fp32
                    out[rows, cols] += delta.to(out.dtype)
        if self._plan is not None:
            self._plan.run(x, out, stack)

    def _make_plan(self, meta: LoRAStepMetadata, device: torch.device) -> None:
        """Split the step's segments into long ones and one batched plan (once per step)."""
        if meta is self._plan_meta and meta.step_id == self._plan_step:
            return
        segs = [s for s in meta.host_segments if s[2] != 0 and s[1] > 0]
        short = _batchable(
            sorted((s for s in segs if s[1] <= self.short_segment), key=lambda s: s[1])
        )
        self._long = [s for s in segs if s not in short]
        self._plan = _BatchedPlan(short, device) if short else None
        self._plan_meta, self._plan_step = meta, meta.step_id


def _batchable(by_length: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The shortest segments whose padding to a common length at most doubles their rows.

    Zipf-popular adapters make one long decode segment beside many of a token or two;
    padding all of them to the long one's length would multiply the work, so the long
    ones run on their own.
    """
    rows = 0
    keep = 0
    for i, (_, length, _) in enumerate(by_length):
        rows += length
        if (i + 1) * length <= 2 * rows:
            keep = i + 1
    return by_length[:keep] if keep >= 2 else []


class _BatchedPlan:
    """Padded gather/scatter indices for running many short segments as one bmm pair."""

    def __init__(self, segments: list[tuple[int, int, int]], device: torch.device) -> None:
        width = max(length for _, length, _ in segments)
        rows = torch.zeros(len(segments), width, dtype=torch.long)  # [S, L] token index
        valid = torch.zeros(len(segments), width, dtype=torch.bool)  # [S, L]
        for i, (start, length, _) in enumerate(segments):
            rows[i, :length] = torch.arange(start, start + length)
            rows[i, length:] = start  # padding reads a real row; its result is dropped
            valid[i, :length] = True
        self.slots_host = [slot for _, _, slot in segments]
        self.slots = torch.tensor(self.slots_host, dtype=torch.long, device=device)  # [S]
        self.gather = rows.view(-1).to(device)  # [S*L]
        self.padded = not bool(valid.all())
        self.scatter = rows[valid].to(device)  # [n_valid]
        self.valid = valid.view(-1).to(device)  # [S*L]
        self.shape = (len(segments), width)

    def run(self, x, out, stack) -> None:
        """Rank rows past a slot's true rank are zero in the stack, so the widest rank of
        the plan serves every slot exactly (its extra terms are exact zeros)."""
        num_segs, width = self.shape
        slice_ranks = [max(ranks[s] for s in self.slots_host) for ranks in stack.ranks]  # [NS]
        r = max(slice_ranks)
        if r == 0:
            return
        xs = x.index_select(0, self.gather).view(num_segs, width, -1).float()  # [S, L, in]
        a = stack.lora_a[:, :, :r].index_select(0, self.slots).float()  # [S, NS, r, in]
        y = torch.matmul(xs[:, None], a.transpose(2, 3))  # [S, NS, L, r] fp32
        for s, rs in enumerate(slice_ranks):
            if rs == 0:
                continue
            cols = slice(stack.offsets[s], stack.offsets[s + 1])
            b = stack.lora_b[:, cols, :rs].index_select(0, self.slots).float()  # [S, N_s, rs]
            delta = torch.bmm(y[:, s, :, :rs], b.transpose(1, 2)).view(
                num_segs * width, -1
            )  # [S*L, N_s]
            if self.padded:
                delta = delta[self.valid]
            out[:, cols].index_add_(0, self.scatter, delta.to(out.dtype))


def select_backend(name: str, device: torch.device) -> LoRABackend:
    """Pick the backend: ``auto`` is Triton on CUDA when importable, torch elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        if not _triton_available():
            raise ValueError("lora_backend=triton needs the triton package (pip install triton)")
        from peftserve.lora.triton_backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"unknown lora backend {name!r}; choose auto, torch or triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
