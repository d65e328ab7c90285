"""Per-step LoRA segment metadata, filled once per step into preallocated buffers.

The scheduler orders a step's sequences by adapter slot, so the tokens that share a
slot are contiguous in the packed batch. ``prepare`` turns the per-token slot list into
segments (runs of one slot); every ``MultiLoRALinear`` of the model reads the same
object during the step. Buffers are allocated once, so their addresses never change
(safe for CUDA-graph capture); the host copies spare the torch backend a device sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LoRAStepMetadata:
    """Segments of one step: ``seg_start[i] .. seg_start[i] + seg_len[i]`` use ``seg_slot[i]``."""

    def __init__(self, max_tokens: int, max_segments: int, device: torch.device | str) -> None:
        self.max_tokens = max_tokens
        self.max_segments = max_segments
        self.device = torch.device(device)
        self.token_slot = torch.zeros(max_tokens, dtype=torch.int32, device=self.device)  # [T]
        self.seg_start = torch.zeros(max_segments, dtype=torch.int32, device=self.device)  # [S]
        self.seg_len = torch.zeros(max_segments, dtype=torch.int32, device=self.device)  # [S]
        self.seg_slot = torch.zeros(max_segments, dtype=torch.int32, device=self.device)  # [S]
        self.num_tokens = 0
        self.num_segments = 0
        # Host mirrors (python ints) of the live part of the buffers.
        self.host_segments: list[tuple[int, int, int]] = []  # (start, length, slot)
        self.has_lora = False
        self.step_id = 0
        """Bumped by every ``prepare``: lets backends cache per-step plans."""

    def prepare(self, token_slots: Sequence[int]) -> None:
        """Fill the buffers for one step from the slot of every packed token."""
        n = len(token_slots)
        if n > self.max_tokens:
            raise ValueError(f"step has {n} tokens, more than the {self.max_tokens} preallocated")
        slots_cpu = torch.as_tensor(token_slots, dtype=torch.int32)  # [T]
        seg_slots, seg_lens = torch.unique_consecutive(slots_cpu, return_counts=True)
        if len(seg_slots) > self.max_segments:
            raise ValueError(f"step has {len(seg_slots)} segments, more than {self.max_segments}")
        seg_starts = torch.cumsum(seg_lens, 0) - seg_lens
        segments = list(zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist(), strict=True))
        self.num_tokens = n
        self.num_segments = len(segments)
        self.host_segments = segments
        self.has_lora = any(slot != 0 for _, _, slot in segments)
        self.step_id += 1
        host = torch.zeros(3, self.max_segments, dtype=torch.int32)
        if segments:
            host[:, : len(segments)] = torch.tensor(segments, dtype=torch.int32).T
        self.seg_start.copy_(host[0], non_blocking=True)
        self.seg_len.copy_(host[1], non_blocking=True)
        self.seg_slot.copy_(host[2], non_blocking=True)
        if n:
            self.token_slot[:n].copy_(slots_cpu, non_blocking=True)
