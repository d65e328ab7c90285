"""LoRA compute backends behind one small interface, and the selector.

Semantics of ``add_lora`` (what every backend computes, written as plain torch)::

    for start, length, slot in segments:          # slot 0 = no adapter: skipped
        if slot == 0: continue
        r = ranks[slot]
        xs = x[start:start+length]                                  # [n, in]
        y = xs.float() @ lora_a[slot, :r].float().T                 # [n, r] fp32 (shrink)
        out[start:start+length] += (y @ lora_b[slot, :, :r].float().T).to(out.dtype)  # expand

Rows of ``out`` outside the adapter segments are left untouched.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from peftserve.lora.metadata import LoRAStepMetadata

logger = logging.getLogger(__name__)


class LoRABackend(Protocol):
    """What ``MultiLoRALinear`` calls once per forward."""

    name: str

    def add_lora(
        self,
        x: torch.Tensor,  # [T, in]
        out: torch.Tensor,  # [T, out], updated in place
        lora_a: torch.Tensor,  # [num_slots, r_max, in]
        lora_b: torch.Tensor,  # [num_slots, out, r_max], scaling folded in
        ranks: list[int],  # true rank per slot (host), 0 for empty slots
        meta: LoRAStepMetadata,
    ) -> None: ...


class TorchBackend:
    """Plain-torch reference: the CPU path and the test oracle for the kernels.

    Long segments (prefill chunks) run as one pair of matmuls each. Short segments
    (decode tokens grouped by adapter) are padded to a common length and run as one
    batched matmul pair over all of them: a decode step then costs a handful of ops per
    layer however many adapters it holds, instead of a few ops per adapter.
    """

    name = "torch"
    short_segment = 32
    """Segments up to this many tokens go through the batched path."""

    def __init__(self) -> None:
        self._plan_key: tuple[int, int] | None = None
        self._plan: _BatchedPlan | None = None
        self._long: list[tuple[int, int, int]] = []

    def add_lora(self, x, out, lora_a, lora_b, ranks, meta) -> None:
        self._make_plan(meta, x.device)
        for start, length, slot in self._long:
            r = ranks[slot]
            if r == 0:
                continue
            xs = x[start : start + length]
            y = xs.float() @ lora_a[slot, :r].float().T  # [n, r] fp32
            delta = y @ lora_b[slot, :, :r].float().T  # [n, out] fp32
            out[start : start + length] += delta.to(out.dtype)
        if self._plan is not None:
            self._plan.run(x, out, lora_a, lora_b, ranks)

    def _make_plan(self, meta: LoRAStepMetadata, device: torch.device) -> None:
        """Split the step's segments into long ones and one batched plan (once per step)."""
        key = (id(meta), meta.step_id)
        if key == self._plan_key:
            return
        segs = [s for s in meta.host_segments if s[2] != 0 and s[1] > 0]
        short = _batchable(sorted((s for s in segs if s[1] <= self.short_segment), key=lambda s: s[1]))
        self._long = [s for s in segs if s not in short]
        self._plan = _BatchedPlan(short, device) if short else None
        self._plan_key = key


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

    def run(self, x, out, lora_a, lora_b, ranks) -> None:
        r = max(ranks[s] for s in self.slots_host)
        if r == 0:
            return
        num_segs, width = self.shape
        xs = x.index_select(0, self.gather).view(num_segs, width, -1).float()  # [S, L, in]
        a = lora_a[:, :r].index_select(0, self.slots).float()  # [S, r, in]
        b = lora_b[:, :, :r].index_select(0, self.slots).float()  # [S, out, r]
        y = torch.bmm(xs, a.transpose(1, 2))  # [S, L, r] fp32
        delta = torch.bmm(y, b.transpose(1, 2)).view(num_segs * width, -1)  # [S*L, out]
        if self.padded:
            delta = delta[self.valid]
        out.index_add_(0, self.scatter, delta.to(out.dtype))


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
