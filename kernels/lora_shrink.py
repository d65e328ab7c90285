"""LoRA shrink: ``y = x @ A[slot]^T`` per segment, accumulated and written in fp32.

One program computes a ``[BLOCK_M, width]`` tile of ``y``: ``BLOCK_M`` tokens of one
segment (see ``_segments``) times the rank rows of that segment's adapter, looping over the
input features in ``BLOCK_K`` steps. With slices (q/k/v or gate/up: projections of one
input), the grid's second axis is the slice: one launch computes every slice's ``x @ A^T``
from the slice's own A stack and true rank. ``width`` is the narrowest power of two (16..BLOCK_R)
that covers the slot's true rank, and rows past the rank are masked, so a rank-8 adapter
multiplies a 16-row tile of A, never ``r_max`` rows of zero padding. With a 3-d ``y`` the
input features are split ``SPLIT`` ways across programs (more programs for small batches),
each writing its partial sum; ``lora_expand`` adds the partials in a fixed order, so the
result is deterministic. The math is in ``lora_shrink``'s docstring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._segments import (
    INTERPRETING,
    check_operands,
    check_segments,
    find_tile,
    launch_kwargs,
    max_tiles,
    pick_configs,
    quick_bench,
    token_bucket,
)

# Autotuned (BLOCK_M, BLOCK_K, num_warps, num_stages), in order of preference; _prune keeps
# the ones that suit the token count and fit shared memory (the 2-stage ones are for fp32).
_TUNE = [(16, 128, 4, 3), (16, 256, 4, 3), (16, 64, 4, 2), (32, 128, 4, 3), (64, 64, 4, 4),
         (64, 128, 8, 3), (64, 64, 4, 2), (128, 64, 8, 3)]
_INTERPRET = [(16, 128, 1, 1)]  # one config: the interpreter cannot time configs
TUNE_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for m, k, w, s in (_INTERPRET if INTERPRETING else _TUNE)
]
# Config the autotuner chose, per (K, R, token bucket, SPLIT, slices, dtype): later calls launch the
# kernel directly, skipping the autotuner's per-call bookkeeping.
_CHOSEN: dict[tuple, dict] = {}


def smem_bytes(config: triton.Config, elem_bytes: int, block_r: int) -> int:
    """Shared memory the operand tiles of ``config`` take: x and A tiles, every stage."""
    return (config.kwargs["BLOCK_M"] + block_r) * config.kwargs["BLOCK_K"] * elem_bytes * config.num_stages


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    elem, block_r = args["x_ptr"].element_size(), args["BLOCK_R"]
    return pick_configs(configs, args["T_BUCKET"], lambda c: smem_bytes(c, elem, block_r))


@triton.autotune(
    configs=TUNE_CONFIGS,
    key=["K", "R", "T_BUCKET", "SPLIT", "NUM_SLICES"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=quick_bench,
)
@triton.jit(do_not_specialize=["num_tokens", "num_segs"])
def _shrink_kernel(
    x_ptr,  # [T, K]
    a_ptr,  # [num_slots, NUM_SLICES, R, K]
    y_ptr,  # [NUM_SLICES, SPLIT, T, >= R] fp32 partial sums
    slot_rank_ptr,  # [num_slots, NUM_SLICES] int32
    seg_start_ptr,  # [S] int32
    seg_len_ptr,  # [S] int32
    seg_slot_ptr,  # [S] int32
    num_tokens,
    num_segs,
    K,
    R,
    T_BUCKET,
    stride_xt,
    stride_xk,
    stride_as,
    stride_asl,
    stride_ar,
    stride_ak,
    stride_ysl,
    stride_ys,
    stride_yt,
    stride_yr,
    SEG_P2: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    sl = tl.program_id(1)  # the slice
    r_blocks = tl.cdiv(R, BLOCK_R)
    tile = pid // (r_blocks * SPLIT)
    r0 = (pid // SPLIT) % r_blocks * BLOCK_R
    split = pid % SPLIT
    seg, m_block, start, length, slot, rank = find_tile(
        tile, seg_start_ptr, seg_len_ptr, seg_slot_ptr, slot_rank_ptr, num_segs, SEG_P2, BLOCK_M,
        NUM_SLICES)
    if seg >= num_segs:
        return
    if NUM_SLICES > 1:
        rank = tl.load(slot_rank_ptr + slot * NUM_SLICES + sl)
    if r0 >= rank:
        return
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows inside the segment
    rows = (start + offs_m).to(tl.int64)
    row_ok = (offs_m < length) & (rows < num_tokens)
    a_slot = a_ptr + slot.to(tl.int64) * stride_as + sl * stride_asl
    y_part = y_ptr + sl * stride_ysl + split * stride_ys
    k_per = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K  # this program's slice of K
    k_lo = split * k_per
    k_hi = tl.minimum(K, k_lo + k_per)

    # The narrowest power-of-two tile (>= 16, the smallest dot) that covers the slot's rank
    # left in this block: a rank-8 adapter multiplies 16 rows of A, not BLOCK_R.
    width = rank - r0
    if BLOCK_R <= 16:
        _shrink_tile(x_ptr, a_slot, y_part, rows, row_ok, r0, rank, k_lo, k_hi, stride_xt, stride_xk,
                     stride_ar, stride_ak, stride_yt, stride_yr, BLOCK_M, BLOCK_R, BLOCK_K,
                     PRECISION, UPCAST)
    elif width <= 16:
        _shrink_tile(x_ptr, a_slot, y_part, rows, row_ok, r0, rank, k_lo, k_hi, stride_xt, stride_xk,
                     stride_ar, stride_ak, stride_yt, stride_yr, BLOCK_M, 16, BLOCK_K,
                     PRECISION, UPCAST)
    elif BLOCK_R <= 32 or width <= 32:
        _shrink_tile(x_ptr, a_slot, y_part, rows, row_ok, r0, rank, k_lo, k_hi, stride_xt, stride_xk,
                     stride_ar, stride_ak, stride_yt, stride_yr, BLOCK_M, 32, BLOCK_K,
                     PRECISION, UPCAST)
    elif BLOCK_R <= 64 or width <= 64:
        _shrink_tile(x_ptr, a_slot, y_part, rows, row_ok, r0, rank, k_lo, k_hi, stride_xt, stride_xk,
                     stride_ar, stride_ak, stride_yt, stride_yr, BLOCK_M, 64, BLOCK_K,
                     PRECISION, UPCAST)
    else:
        _shrink_tile(x_ptr, a_slot, y_part, rows, row_ok, r0, rank, k_lo, k_hi, stride_xt, stride_xk,
                     stride_ar, stride_ak, stride_yt, stride_yr, BLOCK_M, BLOCK_R, BLOCK_K,
                     PRECISION, UPCAST)


@triton.jit
def _shrink_tile(
    x_ptr, a_slot, y_part, rows, row_ok, r0, rank, k_lo, k_hi,
    stride_xt, stride_xk, stride_ar, stride_ak, stride_yt, stride_yr,
    BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """y_part[rows, r0:r0+WIDTH] = x[rows, k_lo:k_hi] @ A[r0:r0+WIDTH, k_lo:k_hi]^T, rank-masked."""
    offs_r = r0 + tl.arange(0, WIDTH)  # [W]
    r_ok = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + rows[:, None] * stride_xt + (k_lo + offs_k)[None, :] * stride_xk  # [BM, BK]
    a_ptrs = a_slot + offs_r[:, None] * stride_ar + (k_lo + offs_k)[None, :] * stride_ak  # [W, BK]
    acc = tl.zeros((BLOCK_M, WIDTH), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_ok = offs_k < k_hi - k
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        at = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # [W, BK]
        if UPCAST:  # the interpreter (triton 3.9) multiplies bf16 as raw uint16 bits
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, tl.trans(at), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    y_ptrs = y_part + rows[:, None] * stride_yt + offs_r[None, :] * stride_yr  # [BM, W]
    tl.store(y_ptrs, acc, mask=row_ok[:, None] & r_ok[None, :])


def lora_shrink(
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [num_slots, R, K] or, sliced, [num_slots, NS, R, K]
    slot_ranks: torch.Tensor,  # [num_slots] or [num_slots, NS] int32, true rank (0 = empty)
    seg_start: torch.Tensor,  # [S] int32
    seg_len: torch.Tensor,  # [S] int32
    seg_slot: torch.Tensor,  # [S] int32
    y: torch.Tensor,  # [T, >= R], [SPLIT, T, >= R] or, sliced, [NS, SPLIT, T, >= R] fp32
    config: triton.Config | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Write ``x @ lora_a[slot, :rank]^T`` into ``y`` for every adapter segment; return ``y``.

    Semantics (``y`` 2-d)::

        for start, length, slot in zip(seg_start, seg_len, seg_slot):
            r = slot_ranks[slot]
            if slot == 0 or r == 0 or length == 0:
                continue                                   # rows of y left untouched
            rows = slice(start, start + length)
            y[rows, :r] = x[rows].float() @ lora_a[slot, :r].float().T   # [n, r] fp32

    Columns ``r:`` of a written row are left untouched too. With ``y`` of shape
    ``[SPLIT, T, R]`` the same rows and columns hold split-K partial sums instead:
    ``y.sum(0)[rows, :r]`` is the product above (``lora_expand`` takes that ``y`` as is).
    Sliced (4-d ``lora_a``): the above for every slice ``s`` with ``lora_a[:, s]``,
    ``slot_ranks[:, s]`` and ``y[s]``, in one launch.

    ``config`` runs that one config instead of autotuning (tests, tuning sweeps);
    ``check=False`` skips the operand checks (callers that validated at load and prepare).
    """
    if lora_a.dim() == 3:
        lora_a = lora_a.unsqueeze(1)  # [num_slots, 1, R, K]
        y4 = y.unsqueeze(0) if y.dim() == 3 else y[None, None] if y.dim() == 2 else y
    else:
        y4 = y
    num_tokens, k = x.shape
    num_slots, num_slices, r, ka = lora_a.shape
    if check:
        if x.dim() != 2 or lora_a.dim() != 4 or y4.dim() != 4 or y4.shape[0] != num_slices:
            raise ValueError("expected x [T, K], lora_a [num_slots, (NS,) R, K] and y [(NS, SPLIT,) T, R]")
        if ka != k:
            raise ValueError(f"lora_a has {ka} input features, x has {k}")
        check_operands(("x", x), ("lora_a", lora_a), y4, num_tokens, r)
        check_segments(slot_ranks, seg_start, seg_len, seg_slot, num_slots, x.device, num_slices)
    num_segs = seg_start.numel()
    if num_tokens == 0 or num_segs == 0:
        return y
    split = y4.shape[1]
    block_r = min(max(16, triton.next_power_of_2(r)), 128)
    upcast = x.dtype == torch.bfloat16 and INTERPRETING
    bucket = token_bucket(num_tokens)

    def grid(meta: dict) -> tuple[int, int]:
        return (max_tiles(num_tokens, num_segs, meta["BLOCK_M"]) * triton.cdiv(r, block_r) * split, num_slices)

    args = (x, lora_a, y4, slot_ranks, seg_start, seg_len, seg_slot,
            num_tokens, num_segs, k, r, bucket,
            x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), lora_a.stride(3),
            y4.stride(0), y4.stride(1), y4.stride(2), y4.stride(3))
    consts = dict(
        SEG_P2=max(16, triton.next_power_of_2(num_segs)),
        NUM_SLICES=num_slices,
        BLOCK_R=block_r,
        SPLIT=split,
        PRECISION="tf32x3" if x.dtype == torch.float32 or upcast else "tf32",
        UPCAST=upcast,
    )
    if config is not None:
        _shrink_kernel.fn[grid](*args, **consts, **launch_kwargs(config))
        return y
    key = (k, r, bucket, split, num_slices, x.dtype)
    chosen = _CHOSEN.get(key)
    if chosen is None:  # first use of this shape: autotune, then remember the winner
        _shrink_kernel[grid](*args, **consts)
        _CHOSEN[key] = launch_kwargs(_shrink_kernel.best_config)
    else:
        _shrink_kernel.fn[grid](*args, **consts, **chosen)
    return y
