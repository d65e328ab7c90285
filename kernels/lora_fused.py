"""LoRA shrink and expand in one launch, for decode-sized steps: ``out += (x @ A^T) @ B^T``.

At decode sizes the two-launch pair is latency-bound: the expand cannot start before every
shrink program has written its share of ``y``, and each launch is too small to fill the
GPU. Here one program owns a ``BLOCK_M``-token tile of one segment and a ``CHUNK_N``-wide
range of one slice's output columns: it computes the tile's fp32 ``y = x @ A[slot, :rank]^T``
over all input features into registers (never written to memory), then loops over its
columns, ``out[rows, cols] += y @ B[slot, cols, :rank]^T``. The programs of one tile each
recompute the same small ``y`` (the A rows of an adapter are read once from memory and
then from L2 by its siblings); ``CHUNK_N`` is chosen per token count so that the launch
has about two programs per SM. The grid depends only on the token count, the size of the
segment buffers and the weight shapes (CUDA-graph safe). The math is in
``lora_shrink_expand``'s docstring.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._segments import (
    INTERPRETING,
    SMEM_BUDGET,
    autotune_enabled,
    check_operands,
    check_segments,
    find_tile,
    launch_kwargs,
    max_tiles,
    num_chunks,
    num_chunks_of,
    quick_bench,
    slice_bounds,
    slice_of,
    token_bucket,
)

BLOCK_M = 16
FUSED_MAX_TOKENS = 128
"""Steps up to this many tokens take the fused launch in ``TritonBackend`` (decode sizes)."""
CHUNK_MULTIPLE = 256  # every config's BLOCK_N divides the chunk width

# Autotuned (BLOCK_K, BLOCK_N, num_warps, num_stages), in order of preference: wide B and
# out tiles keep enough bytes in flight per program for the column loop to stream.
_TUNE = [
    (256, 256, 4, 3),
    (128, 256, 4, 4),
    (256, 128, 4, 3),
    (128, 128, 4, 3),
    (64, 256, 4, 4),
    (64, 64, 4, 2),
]
_INTERPRET = [(64, 32, 1, 1)]  # one config: the interpreter cannot time configs
TUNE_CONFIGS = [
    triton.Config({"BLOCK_K": k, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for k, n, w, s in (_INTERPRET if INTERPRETING else _TUNE)
]
# Config the autotuner chose, per (K, N, slices, token bucket, rank tile, dtype).
_CHOSEN: dict[tuple, dict] = {}


def smem_bytes(config: triton.Config, elem_bytes: int, block_r: int) -> int:
    """Shared memory estimate of ``config``: the x and A tiles of every stage and one B tile,
    doubled for fp32 (its tf32x3 dots convert layouts through shared memory). An upper bound
    of what triton 3.9 allocates for sm_90 in every case measured (bf16 ranks 16-128, fp32
    ranks 64-128)."""
    k, n, stages = config.kwargs["BLOCK_K"], config.kwargs["BLOCK_N"], config.num_stages
    size = (BLOCK_M + block_r) * k * elem_bytes * stages + block_r * n * elem_bytes
    return size * (2 if elem_bytes == 4 else 1)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    elem, block_r = args["x_ptr"].element_size(), args["BLOCK_R"]
    kept = [c for c in configs if smem_bytes(c, elem, block_r) <= SMEM_BUDGET]
    kept = kept or [min(configs, key=lambda c: smem_bytes(c, elem, block_r))]
    return kept if autotune_enabled() else kept[:1]


@triton.autotune(
    configs=TUNE_CONFIGS,
    key=["K", "N", "T_BUCKET", "NUM_SLICES", "BLOCK_R"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["out_ptr"],
    do_bench=quick_bench,
)
@triton.jit(do_not_specialize=["num_tokens", "num_segs", "chunk_n"])
def _fused_kernel(
    x_ptr,  # [T, K]
    a_ptr,  # [num_slots, NUM_SLICES, R, K]
    b_ptr,  # [num_slots, N, R]
    out_ptr,  # [T, N]
    slot_rank_ptr,  # [num_slots, NUM_SLICES] int32
    seg_start_ptr,  # [S] int32
    seg_len_ptr,  # [S] int32
    seg_slot_ptr,  # [S] int32
    num_tokens,
    num_segs,
    chunk_n,
    K,
    N,
    N_OFF1,
    N_OFF2,
    T_BUCKET,
    stride_xt,
    stride_xk,
    stride_as,
    stride_asl,
    stride_ar,
    stride_ak,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ot,
    stride_on,
    SEG_P2: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION_A: tl.constexpr,
    PRECISION_B: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    chunks = num_chunks_of(N_OFF1, N_OFF2, N, chunk_n)
    seg, m_block, start, length, slot, rank = find_tile(
        pid // chunks, seg_start_ptr, seg_len_ptr, seg_slot_ptr, slot_rank_ptr, num_segs, SEG_P2, BLOCK_M,
        NUM_SLICES)  # fmt: skip
    if seg >= num_segs:
        return
    sl, n_lo, n_end = slice_of(pid % chunks, N_OFF1, N_OFF2, N, chunk_n)
    if NUM_SLICES > 1:
        rank = tl.load(slot_rank_ptr + slot * NUM_SLICES + sl)
        if rank == 0:
            return
    n_hi = tl.minimum(n_end, n_lo + chunk_n)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows inside the segment
    rows = (start + offs_m).to(tl.int64)
    row_ok = (offs_m < length) & (rows < num_tokens)
    a_slot = a_ptr + slot.to(tl.int64) * stride_as + sl * stride_asl
    b_slot = b_ptr + slot.to(tl.int64) * stride_bs
    # The narrowest power-of-two rank tile (>= 16, the smallest dot) covering the rank
    # (BLOCK_R <= 128).
    if BLOCK_R <= 16 or rank <= 16:
        _fused_tile(x_ptr, a_slot, b_slot, out_ptr, rows, row_ok, rank, K, n_lo, n_hi,
                    stride_xt, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_ot, stride_on,
                    BLOCK_M, 16, BLOCK_K, BLOCK_N, PRECISION_A, PRECISION_B, UPCAST)  # fmt: skip
    elif BLOCK_R <= 32 or rank <= 32:
        _fused_tile(x_ptr, a_slot, b_slot, out_ptr, rows, row_ok, rank, K, n_lo, n_hi,
                    stride_xt, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_ot, stride_on,
                    BLOCK_M, 32, BLOCK_K, BLOCK_N, PRECISION_A, PRECISION_B, UPCAST)  # fmt: skip
    elif BLOCK_R <= 64 or rank <= 64:
        _fused_tile(x_ptr, a_slot, b_slot, out_ptr, rows, row_ok, rank, K, n_lo, n_hi,
                    stride_xt, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_ot, stride_on,
                    BLOCK_M, 64, BLOCK_K, BLOCK_N, PRECISION_A, PRECISION_B, UPCAST)  # fmt: skip
    else:
        _fused_tile(x_ptr, a_slot, b_slot, out_ptr, rows, row_ok, rank, K, n_lo, n_hi,
                    stride_xt, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_ot, stride_on,
                    BLOCK_M, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION_A, PRECISION_B, UPCAST)  # fmt: skip


@triton.jit
def _fused_tile(
    x_ptr, a_slot, b_slot, out_ptr, rows, row_ok, rank, K, n_lo, n_hi,
    stride_xt, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_ot, stride_on,
    BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION_A: tl.constexpr, PRECISION_B: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """out[rows, n_lo:n_hi] += (x[rows] @ A[:rank]^T) @ B[n_lo:n_hi, :rank]^T, y kept in registers."""
    offs_r = tl.arange(0, WIDTH)  # [W]
    r_ok = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk  # [BM, BK]
    a_ptrs = a_slot + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak  # [W, BK]
    y = tl.zeros((BLOCK_M, WIDTH), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        at = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # [W, BK]
        if UPCAST:  # the interpreter (triton 3.9) multiplies bf16 as raw uint16 bits
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        y = tl.dot(xt, tl.trans(at), y, input_precision=PRECISION_A)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak

    offs_n = tl.arange(0, BLOCK_N)  # [BN]
    for n in range(n_lo, n_hi, BLOCK_N):
        cols = n + offs_n
        n_ok = cols < n_hi
        o_ptrs = out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_on  # [BM, BN]
        o_mask = row_ok[:, None] & n_ok[None, :]
        base = tl.load(o_ptrs, mask=o_mask, other=0.0)
        b_ptrs = b_slot + cols[None, :] * stride_bn + offs_r[:, None] * stride_br  # [W, BN]
        bt = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        delta = tl.dot(y, bt, input_precision=PRECISION_B)  # [BM, BN] fp32
        tl.store(o_ptrs, (base.to(tl.float32) + delta).to(base.dtype), mask=o_mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def chunk_width(num_tokens: int, num_segs: int, n: int, device: torch.device, block_n: int) -> int:
    """Output columns per program: about two programs per SM over the tiles a step of
    ``num_tokens`` can have (a function of sizes only, so a captured graph stays valid)."""
    if device.type != "cuda":
        return max(block_n, triton.next_power_of_2(n))  # the interpreter: fewest programs
    tiles = max(1, max_tiles(num_tokens, num_segs, BLOCK_M))
    per_tile = max(1, triton.cdiv(2 * _num_sms(device), tiles))
    return max(block_n, triton.next_power_of_2(triton.cdiv(n, per_tile)))


def lora_shrink_expand(
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [num_slots, R, K] or, sliced, [num_slots, NS, R, K]
    lora_b: torch.Tensor,  # [num_slots, N, R], scaling folded in; slices side by side along N
    slot_ranks: torch.Tensor,  # [num_slots] or [num_slots, NS] int32, true rank (0 = empty)
    seg_start: torch.Tensor,  # [S] int32
    seg_len: torch.Tensor,  # [S] int32
    seg_slot: torch.Tensor,  # [S] int32
    out: torch.Tensor,  # [T, N], updated in place for adapter rows only
    slices: tuple[int, ...] | None = None,  # output features per slice (sum N); None: one
    chunk_n: int | None = None,
    check: bool = True,
) -> torch.Tensor:
    """``out[rows] += (x[rows] @ A^T) @ B^T`` per adapter segment in one launch; return ``out``.

    Semantics (one slice; sliced: the same for every slice ``s`` on its columns ``cols_s``
    with ``lora_a[:, s]`` and ``slot_ranks[:, s]``)::

        for start, length, slot in zip(seg_start, seg_len, seg_slot):
            r = slot_ranks[slot]
            if slot == 0 or r == 0 or length == 0:
                continue                                   # rows of out left untouched
            rows = slice(start, start + length)
            y = x[rows].float() @ lora_a[slot, :r].float().T             # [n, r] fp32
            delta = y @ lora_b[slot, :, :r].float().T                     # [n, N] fp32
            out[rows] = (out[rows].float() + delta).to(out.dtype)

    The same numbers as ``lora_shrink`` then ``lora_expand`` with an unsplit ``y`` (x·A on
    the tensor cores with fp32 accumulation, ``y @ B`` in tf32, tf32x3 for fp32 weights).
    ``chunk_n`` (a multiple of the kernel's BLOCK_N) overrides the columns per program;
    ``check=False`` skips the operand checks (callers that validated at load and prepare).
    """
    if lora_a.dim() == 3:
        lora_a = lora_a.unsqueeze(1)  # [num_slots, 1, R, K]
    num_tokens, k = x.shape
    num_slots, num_slices, r, ka = lora_a.shape
    n = out.shape[1]
    ns, n_off1, n_off2 = slice_bounds(slices, n)
    if check:
        if x.dim() != 2 or out.dim() != 2 or lora_b.dim() != 3 or lora_a.dim() != 4:
            raise ValueError(
                "expected x [T, K], lora_a [num_slots, (NS,) R, K], lora_b [num_slots, N, R], out [T, N]"
            )
        if (
            ka != k
            or lora_b.shape != (num_slots, n, r)
            or out.shape[0] != num_tokens
            or ns != num_slices
        ):
            raise ValueError(
                f"shapes do not fit: x {list(x.shape)}, lora_a {list(lora_a.shape)}, lora_b {list(lora_b.shape)},"
                f" out {list(out.shape)}, slices {slices}"
            )
        if r > 128:
            raise ValueError(
                f"the fused launch keeps y in registers: rank {r} > 128; use lora_shrink/lora_expand"
            )
        check_operands(("x", x), ("lora_a", lora_a), None, num_tokens, r)
        check_operands(("out", out), ("lora_b", lora_b), None, num_tokens, r)
        check_segments(slot_ranks, seg_start, seg_len, seg_slot, num_slots, x.device, num_slices)
    num_segs = seg_start.numel()
    if num_tokens == 0 or num_segs == 0:
        return out
    upcast = x.dtype == torch.bfloat16 and INTERPRETING
    block_n = _INTERPRET[0][1] if INTERPRETING else CHUNK_MULTIPLE
    widest = max(n_off1, n_off2 - n_off1, n - n_off2)
    chunk = chunk_n or chunk_width(num_tokens, num_segs, widest, x.device, block_n)
    if chunk % block_n:
        raise ValueError(f"chunk_n must be a multiple of {block_n}, not {chunk}")
    grid = (max_tiles(num_tokens, num_segs, BLOCK_M) * num_chunks(n_off1, n_off2, n, chunk),)
    fp32 = x.dtype == torch.float32
    block_r = max(16, triton.next_power_of_2(r))
    bucket = token_bucket(num_tokens)
    args = (x, lora_a, lora_b, out, slot_ranks, seg_start, seg_len, seg_slot,
            num_tokens, num_segs, chunk, k, n, n_off1, n_off2, bucket,
            x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), lora_a.stride(3),
            lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), out.stride(0), out.stride(1))  # fmt: skip
    consts = dict(
        SEG_P2=max(16, triton.next_power_of_2(num_segs)), NUM_SLICES=num_slices, BLOCK_R=block_r,
        PRECISION_A="tf32x3" if fp32 or upcast else "tf32", PRECISION_B="tf32x3" if fp32 else "tf32",
        UPCAST=upcast, BLOCK_M=BLOCK_M,
    )  # fmt: skip
    key = (k, n, n_off1, n_off2, bucket, block_r, x.dtype)
    chosen = _CHOSEN.get(key)
    if chosen is None:  # first use of this shape: autotune, then remember the winner
        _fused_kernel[grid](*args, **consts)
        _CHOSEN[key] = launch_kwargs(_fused_kernel.best_config)
    else:
        _fused_kernel.fn[grid](*args, **consts, **chosen)
    return out
