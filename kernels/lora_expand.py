"""LoRA expand: ``out += y @ B[slot]^T`` per segment, in place (scaling folded into B).

One program updates a ``[BLOCK_M, BLOCK_N]`` tile of ``out``: ``BLOCK_M`` tokens of one
segment (see ``_segments``) times ``BLOCK_N`` output features of one slice (the output
columns of q/k/v or gate/up side by side; one launch serves every slice). It loads the base output
tile first, loops over the slot's true rank in ``BLOCK_R`` (16 or 32) steps, the last one
masked, summing the shrink's split-K partials as it reads ``y``, then adds in fp32 and
stores once. The math is in ``lora_expand``'s docstring.
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
    num_chunks,
    num_chunks_of,
    pick_configs,
    quick_bench,
    slice_bounds,
    slice_of,
    token_bucket,
)

# Autotuned (BLOCK_M, BLOCK_N, num_warps, num_stages); _prune keeps the ones that suit the
# token count and fit shared memory.
_TUNE = [(16, 128, 4, 2), (16, 64, 4, 2), (16, 256, 8, 2), (32, 128, 4, 2), (64, 128, 4, 2),
         (64, 256, 8, 2), (128, 128, 8, 2)]
_INTERPRET = [(16, 128, 1, 1)]  # one config: the interpreter cannot time configs
TUNE_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in (_INTERPRET if INTERPRETING else _TUNE)
]
# Config the autotuner chose, per (N, slice offsets, R, token bucket, SPLIT, dtype): later calls launch the
# kernel directly, skipping the autotuner's per-call bookkeeping.
_CHOSEN: dict[tuple, dict] = {}


def smem_bytes(config: triton.Config, elem_bytes: int, block_r: int) -> int:
    """Shared memory the operand tiles of ``config`` take: y and B tiles, every stage (both
    fp32 at the dot whatever ``elem_bytes``, the weights' size, is)."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return (block_m + block_n) * block_r * 4 * config.num_stages


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    elem, block_r = args["out_ptr"].element_size(), args["BLOCK_R"]
    return pick_configs(configs, args["T_BUCKET"], lambda c: smem_bytes(c, elem, block_r))


@triton.autotune(
    configs=TUNE_CONFIGS,
    key=["N", "R", "T_BUCKET", "SPLIT", "NUM_SLICES"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["out_ptr"],
    do_bench=quick_bench,
)
@triton.jit(do_not_specialize=["num_tokens", "num_segs"])
def _expand_kernel(
    y_ptr,  # [NUM_SLICES, SPLIT, T, >= R] fp32 partial sums
    b_ptr,  # [num_slots, N, R] (the slices' output features side by side)
    out_ptr,  # [T, N]
    slot_rank_ptr,  # [num_slots, NUM_SLICES] int32
    seg_start_ptr,  # [S] int32
    seg_len_ptr,  # [S] int32
    seg_slot_ptr,  # [S] int32
    num_tokens,
    num_segs,
    N,
    N_OFF1,
    N_OFF2,
    R,
    T_BUCKET,
    stride_ysl,
    stride_ys,
    stride_yt,
    stride_yr,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ot,
    stride_on,
    SEG_P2: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R_VEC: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = num_chunks_of(N_OFF1, N_OFF2, N, BLOCK_N)
    seg, m_block, start, length, slot, rank = find_tile(
        pid // n_blocks, seg_start_ptr, seg_len_ptr, seg_slot_ptr, slot_rank_ptr, num_segs, SEG_P2,
        BLOCK_M, NUM_SLICES)
    if seg >= num_segs:
        return
    sl, n_lo, n_end = slice_of(pid % n_blocks, N_OFF1, N_OFF2, N, BLOCK_N)
    if NUM_SLICES > 1:
        rank = tl.load(slot_rank_ptr + slot * NUM_SLICES + sl)
        if rank == 0:
            return
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows inside the segment
    rows = (start + offs_m).to(tl.int64)
    row_ok = (offs_m < length) & (rows < num_tokens)
    offs_n = n_lo + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = offs_n < n_end
    # The base output tile is loaded first, so its latency overlaps the y and B loads.
    o_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_on  # [BM, BN]
    o_mask = row_ok[:, None] & n_ok[None, :]
    base = tl.load(o_ptrs, mask=o_mask, other=0.0)

    offs_r = tl.arange(0, BLOCK_R)  # [BR]
    y_ptrs = y_ptr + sl * stride_ysl + rows[:, None] * stride_yt + offs_r[None, :] * stride_yr  # [BM, BR]
    b_ptrs = (b_ptr + slot.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn
              + offs_r[:, None] * stride_br)  # [BR, BN]
    # Loads cover whole groups of 8 rank columns (16-byte vectors) when the stack's rank
    # stride allows; columns past the true rank are then replaced by zeros (a select, so
    # whatever the padding holds never reaches the sum).
    if R_VEC:
        rank_ld = (rank + 7) // 8 * 8
    else:
        rank_ld = rank

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, rank, BLOCK_R):  # the slot's true rank, not R
        ld_ok = offs_r < rank_ld - r
        r_ok = offs_r < rank - r
        y_mask = row_ok[:, None] & ld_ok[None, :]
        yt = tl.load(y_ptrs, mask=y_mask, other=0.0)  # [BM, BR] fp32
        for s in tl.static_range(1, SPLIT):  # split-K partials, summed in a fixed order
            yt += tl.load(y_ptrs + s * stride_ys, mask=y_mask, other=0.0)
        yt = tl.where(r_ok[None, :], yt, 0.0)
        bt = tl.load(b_ptrs, mask=ld_ok[:, None] & n_ok[None, :], other=0.0)  # [BR, BN]
        bt = tl.where(r_ok[:, None], bt.to(tl.float32), 0.0)
        acc = tl.dot(yt, bt, acc, input_precision=PRECISION)
        y_ptrs += BLOCK_R * stride_yr
        b_ptrs += BLOCK_R * stride_br

    tl.store(o_ptrs, (base.to(tl.float32) + acc).to(base.dtype), mask=o_mask)


def lora_expand(
    y: torch.Tensor,  # [T, >= R], [SPLIT, T, >= R] or [NS, SPLIT, T, >= R] fp32, from lora_shrink
    lora_b: torch.Tensor,  # [num_slots, N, R], scaling folded in; slices side by side along N
    slot_ranks: torch.Tensor,  # [num_slots] or [num_slots, NS] int32, true rank (0 = empty)
    seg_start: torch.Tensor,  # [S] int32
    seg_len: torch.Tensor,  # [S] int32
    seg_slot: torch.Tensor,  # [S] int32
    out: torch.Tensor,  # [T, N], updated in place for adapter rows only
    slices: tuple[int, ...] | None = None,  # output features per slice (sum N); None: one
    config: triton.Config | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Add ``y[:, :rank] @ lora_b[slot, :, :rank]^T`` into ``out`` per adapter segment; return ``out``.

    Semantics (a 3-d ``y`` holds split-K partial sums and is read as ``y.sum(0)``)::

        for start, length, slot in zip(seg_start, seg_len, seg_slot):
            r = slot_ranks[slot]
            if slot == 0 or r == 0 or length == 0:
                continue                                   # rows of out left untouched
            rows = slice(start, start + length)
            delta = y[rows, :r] @ lora_b[slot, :, :r].float().T        # [n, N] fp32
            out[rows] = (out[rows].float() + delta).to(out.dtype)

    Sliced (``slices`` given, ``y`` 4-d, ``slot_ranks`` 2-d): the above for every slice
    ``s`` on its columns ``cols_s`` of ``out`` and ``lora_b``, with ``y[s]`` and
    ``slot_ranks[:, s]``, in one launch.

    The sum is done in fp32 and rounded once. ``y @ B`` runs on the tensor cores in tf32 for
    fp16/bf16 weights (exact for their mantissas; ``y`` keeps 10 bits) and in tf32x3 (about
    fp32 accuracy) for fp32 weights. Only ``y[..., :rank]`` of adapter rows is used.

    ``config`` runs that one config instead of autotuning (tests, tuning sweeps);
    ``check=False`` skips the operand checks (callers that validated at load and prepare).
    """
    y4 = y.unsqueeze(0) if y.dim() == 3 else y[None, None] if y.dim() == 2 else y
    num_tokens, n = out.shape
    num_slots, nb, r = lora_b.shape
    num_slices, n_off1, n_off2 = slice_bounds(slices, n)
    if check:
        if y4.dim() != 4 or lora_b.dim() != 3 or out.dim() != 2 or y4.shape[0] != num_slices:
            raise ValueError("expected y [(NS, SPLIT,) T, R], lora_b [num_slots, N, R] and out [T, N]")
        if nb != n:
            raise ValueError(f"lora_b has {nb} output features, out has {n}")
        check_operands(("out", out), ("lora_b", lora_b), y4, num_tokens, r)
        check_segments(slot_ranks, seg_start, seg_len, seg_slot, num_slots, out.device, num_slices)
    num_segs = seg_start.numel()
    if num_tokens == 0 or num_segs == 0:
        return out
    split = y4.shape[1]
    bucket = token_bucket(num_tokens)

    def grid(meta: dict) -> tuple[int]:
        chunks = num_chunks(n_off1, n_off2, n, meta["BLOCK_N"])
        return (max_tiles(num_tokens, num_segs, meta["BLOCK_M"]) * chunks,)

    args = (y4, lora_b, out, slot_ranks, seg_start, seg_len, seg_slot,
            num_tokens, num_segs, n, n_off1, n_off2, r, bucket,
            y4.stride(0), y4.stride(1), y4.stride(2), y4.stride(3), lora_b.stride(0), lora_b.stride(1),
            lora_b.stride(2), out.stride(0), out.stride(1))
    consts = dict(
        SEG_P2=max(16, triton.next_power_of_2(num_segs)),
        NUM_SLICES=num_slices,
        BLOCK_R=16 if r <= 16 else 32,
        R_VEC=r % 8 == 0 and y4.stride(2) % 4 == 0 and y4.stride(1) % 4 == 0 and y4.stride(0) % 4 == 0,
        SPLIT=split,
        PRECISION="tf32x3" if out.dtype == torch.float32 else "tf32",
    )
    if config is not None:
        _expand_kernel.fn[grid](*args, **consts, **launch_kwargs(config))
        return out
    key = (n, n_off1, n_off2, r, bucket, split, out.dtype)
    chosen = _CHOSEN.get(key)
    if chosen is None:  # first use of this shape: autotune, then remember the winner
        _expand_kernel[grid](*args, **consts)
        _CHOSEN[key] = launch_kwargs(_expand_kernel.best_config)
    else:
        _expand_kernel.fn[grid](*args, **consts, **chosen)
    return out
