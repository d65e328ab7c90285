"""Per-step LoRA segment metadata, filled once per step into preallocated buffers.

The scheduler orders a step's sequences by adapter slot, so the tokens that share a
slot are contiguous in the packed batch. The model runner computes the segments (runs of
one slot) on the host while it packs the step and hands them to ``set_segments``; every
``MultiLoRALinear`` of the model reads the same object during the step. The device
buffers are allocated once, so their addresses never change (safe for CUDA-graph capture);
the host mirror (``host_segments``) spares the torch backend a device sync.

The runner binds the buffers to views of its own step buffers (``bind``), so the segments
travel to the device in the runner's one copy per step; unbound, the object owns its
buffers and copies them itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Segment = tuple[int, int, int]
"""(start row, number of rows, LoRA slot) of one run of rows sharing a slot."""


def segments_of(token_slots: Sequence[int]) -> list[Segment]:
    """The runs of equal slots in ``token_slots`` (host, no tensors)."""
    segments: list[Segment] = []
    start = 0
    for i in range(1, len(token_slots) + 1):
        if i == len(token_slots) or token_slots[i] != token_slots[start]:
            segments.append((start, i - start, int(token_slots[start])))
            start = i
    return segments


class LoRAStepMetadata:
    """Segments of one step: ``seg_start[i] .. seg_start[i] + seg_len[i]`` use ``seg_slot[i]``;
    entries past ``num_segments`` have length 0."""

    def __init__(self, max_tokens: int, max_segments: int, device: torch.device | str) -> None:
        self.max_tokens = max_tokens
        self.max_segments = max_segments
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        host = torch.zeros(3, max_segments, dtype=torch.int32, pin_memory=pin)  # [3, S]
        dev = (
            host
            if self.device.type == "cpu"
            else torch.zeros(3, max_segments, dtype=torch.int32, device=self.device)
        )
        self._bind(host, dev, owns_copy=self.device.type != "cpu")
        self.num_tokens = 0
        self.num_segments = 0
        self.host_segments: list[Segment] = []
        """The live segments, (start, length, slot), host ints."""
        self.has_lora = False
        """Some segment has a slot other than 0."""
        self.step_id = 0
        """Bumped by every ``set_segments``: lets backends cache per-step plans."""

    def bind(self, host: torch.Tensor, device: torch.Tensor) -> None:
        """Use ``host`` [3, max_segments] int32 (CPU) and ``device`` (same shape, on this
        object's device; the same tensor on CPU) as the buffers. The caller copies host to
        device after each ``set_segments``; call before any CUDA-graph capture."""
        for t in (host, device):
            if t.shape != (3, self.max_segments) or t.dtype != torch.int32 or not t.is_contiguous():
                raise ValueError(
                    f"LoRA metadata buffers must be contiguous int32 [3, {self.max_segments}]"
                )
        self._bind(host, device, owns_copy=False)

    def _bind(self, host: torch.Tensor, dev: torch.Tensor, owns_copy: bool) -> None:
        self._host = host.numpy()  # [3, S] view of the host buffer
        self._dev = dev
        self._host_tensor = host
        self._copied = (
            torch.cuda.Event() if owns_copy else None
        )  # the last copy left the host buffer
        self._dirty = self.max_segments  # entries that may be non-zero
        self.seg_start, self.seg_len, self.seg_slot = dev[0], dev[1], dev[2]  # [S] int32 each

    def set_segments(self, segments: list[Segment], num_tokens: int) -> None:
        """Publish one step's segments (contiguous, in row order, covering ``num_tokens`` rows
        or fewer: rows outside every segment get no LoRA)."""
        n = len(segments)
        if num_tokens > self.max_tokens:
            raise ValueError(
                f"step has {num_tokens} tokens, more than the {self.max_tokens} preallocated"
            )
        if n > self.max_segments:
            raise ValueError(f"step has {n} segments, more than {self.max_segments}")
        host = self._host
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy may still read the host buffer
        if n:
            host[:, :n] = np.array(segments, dtype=np.int32).T
        if self._dirty > n:
            host[:, n : self._dirty] = 0
        self._dirty = n
        self.num_tokens = num_tokens
        self.num_segments = n
        self.host_segments = segments
        self.has_lora = any(slot != 0 for _, _, slot in segments)
        self.step_id += 1
        if self._copied is not None:
            self._dev.copy_(self._host_tensor, non_blocking=True)
            self._copied.record()

    def prepare(self, token_slots: Sequence[int]) -> None:
        """``set_segments`` from the slot of every packed token (tests, benchmarks)."""
        self.set_segments(segments_of(token_slots), len(token_slots))
