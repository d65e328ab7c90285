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
    """Plain-torch reference: the CPU path and the test oracle for the kernels."""

    name = "torch"

    def add_lora(self, x, out, lora_a, lora_b, ranks, meta) -> None:
        for start, length, slot in meta.host_segments:
            r = ranks[slot]
            if slot == 0 or r == 0 or length == 0:
                continue
            xs = x[start : start + length]
            y = xs.float() @ lora_a[slot, :r].float().T  # [n, r] fp32
            delta = y @ lora_b[slot, :, :r].float().T  # [n, out] fp32
            out[start : start + length] += delta.to(out.dtype)


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
