"""What the LoRA kernels share: the segment -> tile map, the launch grid, config choice.

Work is cut into *tiles*: ``BLOCK_M`` consecutive tokens of one segment. Segments whose
slot is 0 (no adapter), whose slot has rank 0, or whose length is 0 get no tiles. Every
program recomputes the map from the segment buffers (a cumulative sum over at most a few
hundred int32), so the host never looks at the segmentation: the grid depends only on
the token count and the size of the segment buffers, and a launch can be captured in a
CUDA graph and replayed with other metadata.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Read once, like @triton.jit does when the kernel modules are imported.
INTERPRETING = interpreting()


def token_bucket(num_tokens: int) -> int:
    """Autotune key for the token count: a power of two in 16..8192."""
    return min(max(16, triton.next_power_of_2(num_tokens)), 8192)


def max_tiles(num_tokens: int, num_segments: int, block_m: int) -> int:
    """Upper bound of ``sum(cdiv(len_i, block_m))`` over segments that sum to ``num_tokens``."""
    live = min(num_tokens, num_segments)  # segments of length >= 1
    return (num_tokens + live * (block_m - 1)) // block_m


# Every program scans the whole segment buffer (vectors of this many int32 at most).
MAX_SEGMENTS = 4096

# Shared memory a config may plan for (H100/H200 give a program up to 227 KiB); the
# estimate (operand tiles x stages) is rough, so keep a margin.
SMEM_BUDGET = 160 * 1024


def pick_configs(
    configs: list[triton.Config], block_m_for: int, smem: Callable[[triton.Config], int]
) -> list[triton.Config]:
    """Configs worth timing: ``BLOCK_M`` suited to the token bucket, operands fit shared memory.

    With ``PEFTSERVE_TRITON_AUTOTUNE=0`` only the first of them (the list is in order of
    preference) is used: no timing runs, one compile per shape bucket.
    """
    if block_m_for <= 64:
        wanted: tuple[int, ...] = (16,)
    elif block_m_for <= 512:
        wanted = (16, 32, 64)
    else:
        wanted = (16, 32, 64, 128)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] in wanted and smem(c) <= SMEM_BUDGET]
    kept = kept or [min(configs, key=smem)]
    return kept if autotune_enabled() else kept[:1]


def autotune_enabled() -> bool:
    """False when ``PEFTSERVE_TRITON_AUTOTUNE=0``: take each bucket's first-choice config."""
    return os.environ.get("PEFTSERVE_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def split_of(y: torch.Tensor) -> tuple[int, int]:
    """(SPLIT, stride between partials) of an fp32 intermediate [T, R] or [SPLIT, T, R]."""
    return (y.shape[0], y.stride(0)) if y.dim() == 3 else (1, 0)


def launch_kwargs(config: triton.Config) -> dict:
    """Launch keywords that run ``config`` on the un-tuned kernel (tests, tuning sweeps)."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def quick_bench(kernel_call: Callable[[], object], quantiles: list[float] | None) -> float | list[float]:
    """Autotuner timing: short, so tuning a new shape costs tens of milliseconds, not seconds."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def check_operands(
    act: tuple[str, torch.Tensor], weights: tuple[str, torch.Tensor], y: torch.Tensor | None, num_tokens: int,
    rank: int,
) -> None:
    """Dtype and device checks shared by the launchers: the activations (x or out) and the
    adapter weights share a float dtype, and ``y`` is an fp32 ``[..., >= T, >= R]``."""
    (act_name, a), (w_name, w) = act, weights
    if y is not None and (y.dtype != torch.float32 or y.shape[-2] < num_tokens or y.shape[-1] < rank):
        raise ValueError(f"y must be fp32 of at least [{num_tokens}, {rank}], got {y.dtype} {list(y.shape)}")
    if w.dtype != a.dtype:
        raise ValueError(f"{w_name} is {w.dtype}, {act_name} is {a.dtype}: cast the adapter at load")
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {a.dtype}")
    if w.device != a.device or (y is not None and y.device != a.device):
        raise ValueError(f"{act_name}, {w_name} and y must be on one device")


def check_segments(
    slot_ranks: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor, seg_slot: torch.Tensor,
    num_slots: int, device: torch.device, num_slices: int = 1,
) -> None:
    """Input checks shared by the launchers (host-side only: no device sync)."""
    for name, t in (("seg_start", seg_start), ("seg_len", seg_len), ("seg_slot", seg_slot)):
        if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-d int32 tensor")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the activations on {device}")
    if slot_ranks.dtype != torch.int32 or not slot_ranks.is_contiguous() or slot_ranks.device != device:
        raise ValueError(f"slot_ranks must be a contiguous int32 tensor on {device}")
    if not seg_start.numel() == seg_len.numel() == seg_slot.numel():
        raise ValueError("seg_start, seg_len and seg_slot must have the same length")
    if seg_start.numel() > MAX_SEGMENTS:
        raise ValueError(f"{seg_start.numel()} segment slots, more than the kernels' {MAX_SEGMENTS}: "
                         "size the step metadata by the scheduler's max_num_seqs")
    if slot_ranks.numel() != num_slots * num_slices:
        raise ValueError(f"slot_ranks has {slot_ranks.numel()} entries for {num_slots} slots x {num_slices} slices")


MAX_SLICES = 3
"""Most slices one launch serves (q/k/v)."""


def slice_bounds(slices: tuple[int, ...] | list[int] | None, n: int) -> tuple[int, int, int]:
    """(number of slices, offset of slice 1, offset of slice 2) for output features ``n``
    cut into ``slices`` (None: one slice); missing slices start at ``n`` (empty)."""
    if slices is None:
        return 1, n, n
    if not 1 <= len(slices) <= MAX_SLICES or sum(slices) != n or min(slices) < 1:
        raise ValueError(f"slices {list(slices)} must be 1..{MAX_SLICES} positive widths summing to {n}")
    offsets = [sum(slices[:i]) for i in range(1, len(slices))] + [n, n]
    return len(slices), offsets[0], offsets[1]


@triton.jit
def num_chunks_of(n_off1, n_off2, n, CHUNK):
    """``num_chunks`` inside a kernel."""
    return tl.cdiv(n_off1, CHUNK) + tl.cdiv(n_off2 - n_off1, CHUNK) + tl.cdiv(n - n_off2, CHUNK)


@triton.jit
def slice_of(chunk, n_off1, n_off2, n, CHUNK):
    """Map a chunk id over the slices' ``CHUNK``-wide column chunks (each slice's chunks in
    turn) to (slice, first column, end column of the slice)."""
    c0 = tl.cdiv(n_off1, CHUNK)
    c1 = tl.cdiv(n_off2 - n_off1, CHUNK)
    s = (chunk >= c0).to(tl.int32) + (chunk >= c0 + c1).to(tl.int32)
    first = tl.where(s == 0, 0, tl.where(s == 1, c0, c0 + c1))
    start = tl.where(s == 0, 0, tl.where(s == 1, n_off1, n_off2))
    end = tl.where(s == 0, n_off1, tl.where(s == 1, n_off2, n))
    return s, start + (chunk - first) * CHUNK, end


def num_chunks(n_off1: int, n_off2: int, n: int, chunk: int) -> int:
    """Column chunks over all slices (see ``slice_of``)."""
    return triton.cdiv(n_off1, chunk) + triton.cdiv(n_off2 - n_off1, chunk) + triton.cdiv(n - n_off2, chunk)


@triton.jit
def find_tile(
    tile,
    seg_start_ptr,
    seg_len_ptr,
    seg_slot_ptr,
    slot_rank_ptr,
    num_segs,
    SEG_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_SLICES: tl.constexpr = 1,
):
    """Map a tile id to (segment, m-block in it, start, length, slot, rank of the slot).

    ``slot_rank_ptr`` is ``[num_slots, NUM_SLICES]`` (row-major); the rank returned is the
    slot's largest over the slices (a slot whose slices all have rank 0 gets no tiles).
    A segment index >= num_segs means the tile is past the last one: no work. All fields
    come out of the vectors loaded here (no dependent scalar loads after the lookup).
    """
    segs = tl.arange(0, SEG_P2)
    in_buf = segs < num_segs
    starts = tl.load(seg_start_ptr + segs, mask=in_buf, other=0)  # [SEG_P2]
    lens = tl.load(seg_len_ptr + segs, mask=in_buf, other=0)  # [SEG_P2]
    slots = tl.load(seg_slot_ptr + segs, mask=in_buf, other=0)  # [SEG_P2]
    live = in_buf & (slots != 0)
    ranks = tl.load(slot_rank_ptr + slots * NUM_SLICES, mask=live, other=0)  # [SEG_P2]
    for s in tl.static_range(1, NUM_SLICES):
        ranks = tl.maximum(ranks, tl.load(slot_rank_ptr + slots * NUM_SLICES + s, mask=live, other=0))
    tiles = tl.where((slots != 0) & (ranks > 0), (lens + BLOCK_M - 1) // BLOCK_M, 0)
    ends = tl.cumsum(tiles, axis=0)  # inclusive prefix sum
    seg = tl.sum((ends <= tile).to(tl.int32), axis=0)
    pick = segs == seg
    first = tl.sum(tl.where(pick, ends - tiles, 0), axis=0)
    start = tl.sum(tl.where(pick, starts, 0), axis=0)
    length = tl.sum(tl.where(pick, lens, 0), axis=0)
    slot = tl.sum(tl.where(pick, slots, 0), axis=0)
    rank = tl.sum(tl.where(pick, ranks, 0), axis=0)
    return seg, tile - first, start, length, slot, rank
