"""Paged attention over a varlen step, reading K/V from the block tables in place.

One program attends ``BLOCK_Q`` query positions of one sequence for all ``GROUP`` query
heads of one KV head: its query tile is ``[BLOCK_M, D]`` with row ``m`` = (position
``m // GROUP``, head ``m % GROUP``), so K and V are loaded once per KV head and never
repeated (GQA). Keys are visited ``BLOCK_N`` at a time; each key's cache slot is looked up
in the sequence's block table (``block * block_size + offset``), so blocks need not be
contiguous and nothing is gathered into a workspace. Scores go through an online softmax
in fp32 (exp2), with the causal mask, the sliding window and Gemma-2 soft-capping applied
per tile.

Two launch shapes:

* varlen (any step): program ``pid`` finds its sequence by a binary search over
  ``query_start_loc`` (sequence ``i`` owns the programs from ``qsl[i] // BLOCK_Q + i``), so
  the grid ``(T // BLOCK_Q + N, Hkv)`` covers every step's chunks in one launch;
* decode (every query length is 1): program ``(seq, kv head, split)`` takes one slice of
  the context, writes an unnormalized partial result with its max and sum, and a second
  small kernel combines the slices. The grid ``(N, Hkv, splits)`` depends only on the
  batch, the head count and the fixed sizes of the block-table buffer, so the launch can
  be captured in a CUDA graph and replayed for other context lengths.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._segments import INTERPRETING

MIN_SPLIT_TOKENS = 256  # a decode split covers at least this many tokens of the buffer
MAX_SPLITS = 32


@triton.jit
def _tanh(x):
    """tanh from exp2 (no libdevice, so it runs in the interpreter too)."""
    e = tl.exp2(x * (2.0 * 1.4426950408889634))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit(do_not_specialize=["num_seqs", "num_splits", "window", "softcap"])
def _paged_attention_kernel(
    q_ptr,  # [T, H, D]
    cache_ptr,  # [2, Hkv, S, D]
    out_ptr,  # [T, H, D]
    part_acc_ptr,  # [N, H, splits, D] fp32 (decode with splits > 1)
    part_ml_ptr,  # [N, H, splits, 2] fp32: running max (log2 units) and sum
    block_tables_ptr,  # [N, max_blocks] int32
    seq_lens_ptr,  # [N] int32
    qsl_ptr,  # [N + 1] int32
    num_seqs,
    num_splits,
    scale,
    window,
    softcap,
    stride_qt,
    stride_qh,
    stride_ckv,
    stride_ch,
    stride_cs,
    stride_ot,
    stride_oh,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    D_P2: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DECODE: tl.constexpr,
    SPLIT_OUT: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        seq = pid
        q_block = 0
    else:  # the last sequence whose first program is <= pid
        lo = 0
        hi = num_seqs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
            lo = tl.where(first <= pid, mid, lo)
            hi = tl.where(first <= pid, hi, mid)
        seq = lo
        q_block = pid - (tl.load(qsl_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    q_lo = q_block * BLOCK_Q  # first query of this program, inside the sequence
    if q_lo >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # cached tokens before this step's queries

    offs_m = tl.arange(0, BLOCK_M)
    q_local = q_lo + offs_m // GROUP  # [BM] query index inside the sequence
    head = kv_head * GROUP + offs_m % GROUP  # [BM] query head
    row_ok = (offs_m < BLOCK_Q * GROUP) & (q_local < q_len)
    q_pos = context + q_local  # [BM] absolute position of each query
    offs_d = tl.arange(0, D_P2)
    d_ok = offs_d < HEAD_DIM
    rows = (q_start + q_local).to(tl.int64)
    q_ptrs = q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, D]
    if UPCAST:
        q = q.to(tl.float32)

    # Keys this program may see: up to its last query, from its first query's window start.
    hi_key = tl.minimum(seq_len, context + tl.minimum(q_lo + BLOCK_Q, q_len))
    lo_key = 0
    if USE_WINDOW:
        lo_key = tl.maximum(0, context + q_lo - window + 1)
    if DECODE:  # this split's slice, whole BLOCK_N tiles
        chunk = tl.cdiv(tl.cdiv(hi_key - lo_key, num_splits), BLOCK_N) * BLOCK_N
        lo_key = lo_key + split * chunk
        hi_key = tl.minimum(hi_key, lo_key + chunk)

    k_base = cache_ptr + kv_head.to(tl.int64) * stride_ch
    v_base = k_base + stride_ckv
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_P2), dtype=tl.float32)
    for start in range(lo_key, hi_key, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [BN]
        pos_ok = pos < hi_key
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE  # [BN]
        kv_mask = pos_ok[None, :] & d_ok[:, None]
        k = tl.load(
            k_base + slot[None, :] * stride_cs + offs_d[:, None], mask=kv_mask, other=0.0
        )  # [D, BN]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION)  # [BM, BN] fp32
        if USE_SOFTCAP:
            s = softcap * _tanh(s * (scale / softcap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        keep = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            keep = keep & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])  # [BM, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + slot[:, None] * stride_cs + offs_d[None, :],
            mask=pos_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BN, D]
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if SPLIT_OUT:
        part = (seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + head) * num_splits + split  # [BM]
        ok = row_ok
        tl.store(
            part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
            acc,
            mask=ok[:, None] & d_ok[None, :],
        )
        tl.store(part_ml_ptr + part * 2, m_i, mask=ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=ok)
    else:
        o = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        o_ptrs = out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _combine_splits_kernel(
    out_ptr,  # [T, H, D]
    part_acc_ptr,  # [N, H, splits, D] fp32
    part_ml_ptr,  # [N, H, splits, 2] fp32
    qsl_ptr,  # [N + 1] int32
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    D_P2: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) == q_start:
        return
    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = offs_s < num_splits
    part = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + offs_s  # [SP]
    m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
    sums = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # [SP]: 0 for empty splits
    total = tl.sum(sums * w, axis=0)
    offs_d = tl.arange(0, D_P2)
    d_ok = offs_d < HEAD_DIM
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [SP, D]
    o = tl.sum(acc * w[:, None], axis=0)
    o = tl.where(total > 0, o / tl.where(total > 0, total, 1.0), 0.0)
    o_ptrs = out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=d_ok)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Context slices per (sequence, KV head) of a decode launch: enough programs for about
    two waves of the GPU, each slice at least ``MIN_SPLIT_TOKENS`` of ``max_context``.

    A function of the batch, the head count and fixed buffer sizes only (CUDA-graph safe).
    """
    if device.type != "cuda":
        return 1
    programs = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(2 * _num_sms(device), programs)
    cap = max(1, min(MAX_SPLITS, max_context // MIN_SPLIT_TOKENS))
    return min(triton.next_power_of_2(want), cap) if want > 1 else 1


def _tiles(
    head_dim: int, group: int, decode: bool, elem_bytes: int
) -> tuple[int, int, int, int, int]:
    """(BLOCK_Q, BLOCK_M, BLOCK_N, num_warps, num_stages) for a launch. Shared memory, as
    triton 3.9 allocates it for sm_90 with two stages: at most 115 KiB (fp32, head dim 128)
    and 103 KiB (fp32, head dim 256, BLOCK_N 32); bf16 needs under 60 KiB."""
    rows = max(16, triton.next_power_of_2(group))  # the smallest tile of whole groups
    if INTERPRETING:
        return (1 if decode else rows // group), rows, 32, 1, 1
    stages = 2 if elem_bytes == 4 else 3
    if decode:
        return 1, rows, 64 if head_dim <= 128 else 32, 4, stages
    block_m = max(64 if head_dim <= 128 else 32, rows)
    block_n = 32 if elem_bytes == 4 and head_dim > 128 else 64
    return block_m // group, block_m, block_n, 4, stages


def _check_inputs(
    query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor, block_size: int, sliding_window: int | None, decode_only: bool,
) -> None:  # fmt: skip
    """The launcher's input checks (host-side only: no device sync)."""
    if query.dim() != 3 or kv_cache.dim() != 4 or kv_cache.shape[0] != 2:
        raise ValueError("expected query [T, H, D] and kv_cache [2, Hkv, S, D]")
    num_tokens, num_heads, head_dim = query.shape
    num_kv = kv_cache.shape[1]
    num_seqs = seq_lens.numel()
    if kv_cache.shape[3] != head_dim or num_heads % num_kv:
        raise ValueError(f"query {list(query.shape)} does not fit kv_cache {list(kv_cache.shape)}")
    if kv_cache.dtype != query.dtype or query.dtype not in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ):
        raise ValueError(
            f"query is {query.dtype}, kv_cache {kv_cache.dtype}: one float dtype expected"
        )
    for name, t, dims in (
        ("block_tables", block_tables, 2),
        ("seq_lens", seq_lens, 1),
        ("query_start_loc", query_start_loc, 1),
    ):
        if t.dtype != torch.int32 or t.dim() != dims or t.device != query.device:
            raise ValueError(f"{name} must be a {dims}-d int32 tensor on {query.device}")
    if query_start_loc.numel() != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            "query_start_loc needs N + 1 entries and block_tables N rows for N seq_lens"
        )
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, not {block_size}")
    if query.stride(2) != 1 or kv_cache.stride(3) != 1 or block_tables.stride(1) != 1:
        raise ValueError("query, kv_cache and block_tables need a contiguous last dimension")
    if decode_only and num_tokens != num_seqs:
        raise ValueError(f"decode_only with {num_tokens} rows for {num_seqs} sequences")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive, not {sliding_window}")


def paged_attention(
    query: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [2, Hkv, num_blocks * block_size, D]
    block_tables: torch.Tensor,  # [N, max_blocks] int32, padded with a zero block
    seq_lens: torch.Tensor,  # [N] int32, cached tokens after this step's write; 0: padding
    query_start_loc: torch.Tensor,  # [N + 1] int32, rows of seq i: qsl[i] .. qsl[i + 1]
    block_size: int,
    scale: float,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    decode_only: bool = False,
    rows_covered: int | None = None,
    num_splits: int | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Attention of every query row against its sequence's cached keys; returns ``[T, H, D]``.

    Semantics (K/V of this step already written to the cache; ``g = H // Hkv``)::

        out = zeros(T, H, D)
        for i in range(N):
            rows = range(qsl[i], qsl[i + 1]); n = len(rows); ctx = seq_lens[i] - n
            if seq_lens[i] == 0: continue                          # padding: rows stay 0
            slots = [block_tables[i, p // bs] * bs + p % bs for p in range(seq_lens[i])]
            k, v = kv_cache[0][:, slots], kv_cache[1][:, slots]   # [Hkv, L, D]
            for j, row in enumerate(rows):
                p = ctx + j                                        # the query's position
                keys = range(max(0, p - window + 1) if window else 0, p + 1)
                for h in range(H):
                    s = k[h // g, keys].float() @ query[row, h].float() * scale
                    if softcap: s = softcap * tanh(s / softcap)
                    out[row, h] = softmax(s) @ v[h // g, keys].float()

    fp32 scores, softmax and accumulation; ``p @ v`` takes ``p`` in the cache's dtype.
    ``decode_only`` (every query length is 1) splits each sequence's context over
    ``num_splits`` programs (default ``decode_splits``) and combines them in a second
    launch; the grid then depends on ``N`` and the buffer sizes only (CUDA-graph safe).
    Rows from ``rows_covered`` (host value of ``qsl[N]``) to ``T`` belong to no sequence
    and are zeroed. Padding entries of ``block_tables`` are never read. ``check=False``
    skips the input checks (a caller that checked the step's first layer).
    """
    if check:
        _check_inputs(query, kv_cache, block_tables, seq_lens, query_start_loc, block_size, sliding_window,
                      decode_only)  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape
    num_kv = kv_cache.shape[1]
    num_seqs = seq_lens.numel()
    out = query.new_empty(num_tokens, num_heads, head_dim)  # [T, H, D]
    if rows_covered is not None and rows_covered < num_tokens:
        out[rows_covered:].zero_()
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = num_heads // num_kv
    block_q, block_m, block_n, warps, stages = _tiles(
        head_dim, group, decode_only, query.element_size()
    )
    if decode_only:
        context = block_tables.shape[1] * block_size
        if sliding_window is not None:
            context = min(context, sliding_window)
        splits = num_splits or decode_splits(num_seqs, num_kv, context, query.device)
        grid = (num_seqs, num_kv, splits)
    else:
        splits = 1
        grid = (num_tokens // block_q + num_seqs, num_kv, 1)
    split_out = splits > 1
    if split_out:
        part_acc = torch.empty(
            num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=query.device
        )
        part_ml = torch.empty(
            num_seqs, num_heads, splits, 2, dtype=torch.float32, device=query.device
        )
    else:
        part_acc = part_ml = out  # not read
    upcast = INTERPRETING and query.dtype != torch.float32
    _paged_attention_kernel[grid](
        query, kv_cache, out, part_acc, part_ml, block_tables, seq_lens, query_start_loc,
        num_seqs, splits, scale, sliding_window or 0, softcap or 1.0,
        query.stride(0), query.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        HEAD_DIM=head_dim, D_P2=max(16, triton.next_power_of_2(head_dim)), GROUP=group,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        DECODE=decode_only, SPLIT_OUT=split_out, USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=softcap is not None, UPCAST=upcast,
        PRECISION="ieee" if query.dtype == torch.float32 or upcast else "tf32",
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if split_out:
        _combine_splits_kernel[(num_seqs, num_heads)](
            out, part_acc, part_ml, query_start_loc, splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, D_P2=max(16, triton.next_power_of_2(head_dim)),
            SPLITS_P2=max(2, triton.next_power_of_2(splits)), num_warps=1 if INTERPRETING else 4,
        )  # fmt: skip
    return out
