"""Random paged-attention steps and their float64 reference (shared by the attention tests).

A step is a list of sequences ``(query_len, context_len)``; ``(1, -1)`` is a padding
sequence (one row, ``seq_len`` 0). Blocks are handed out in a shuffled order (block-table
holes), the cache is filled with NaN everywhere no sequence owns, finite garbage in the
unused tail of each sequence's last block, zeros in the PAD block.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from peftserve.engine.attention import PagedAttentionMetadata
from peftserve.engine.block_manager import PAD_BLOCK, RESERVED_BLOCKS, SCRATCH_BLOCK

PADDING = (1, -1)


@dataclass
class Step:
    meta: PagedAttentionMetadata
    query: torch.Tensor  # [1, H, T, D] (a transposed view, as the models pass it)
    key: torch.Tensor  # [1, Hkv, T, D]
    value: torch.Tensor  # [1, Hkv, T, D]
    cache_before: torch.Tensor  # [2, Hkv, S, D] without this step's K/V
    specs: list[tuple[int, int]]


def make_step(
    specs: list[tuple[int, int]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    extra_rows: int = 0,
    table_width: int | None = None,
    total_blocks: int | None = None,
) -> Step:
    """A step of ``specs``; ``extra_rows`` rows past the last sequence belong to none;
    ``table_width`` and ``total_blocks`` fix the block-table width and the cache size."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [0 if ctx < 0 else ctx + n for n, ctx in specs]
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = max(total_blocks or 0, RESERVED_BLOCKS + sum(need) + 3)  # >= 3 blocks nobody owns
    ids = list(range(RESERVED_BLOCKS, num_blocks))
    rng.shuffle(ids)
    tables, pos = [], 0
    for k in need:
        tables.append(ids[pos : pos + k])
        pos += k
    width = max(table_width or 0, max(need), 1)
    # Owned blocks: random K/V (finite garbage past seq_len); the rest NaN, PAD zero.
    cache = 3 * torch.randn(
        2, num_kv_heads, num_blocks, block_size, head_dim, generator=gen, dtype=torch.float64
    )
    owned = torch.zeros(num_blocks, dtype=torch.bool)
    owned[[b for t in tables for b in t]] = True
    cache[:, :, ~owned] = math.nan
    cache[:, :, PAD_BLOCK] = 0
    cache = cache.view(2, num_kv_heads, num_blocks * block_size, head_dim)
    slot_mapping, query_start = [], [0]
    for (n, ctx), table in zip(specs, tables, strict=True):
        if ctx < 0:
            slot_mapping += [SCRATCH_BLOCK * block_size] * n
        else:
            for p in range(ctx, ctx + n):
                slot_mapping.append(table[p // block_size] * block_size + p % block_size)
        query_start.append(query_start[-1] + n)
    num_tokens = query_start[-1] + extra_rows
    slot_mapping += [SCRATCH_BLOCK * block_size + 1] * extra_rows
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen, dtype=torch.float64)
    slot_idx = torch.tensor(slot_mapping)
    key = cache[0][:, slot_idx].clone()  # [Hkv, T, D]: what the step writes
    value = cache[1][:, slot_idx].clone()
    pad_rows = [
        r
        for (n, ctx), s in zip(specs, query_start, strict=False)
        if ctx < 0
        for r in range(s, s + n)
    ]
    pad_rows += list(range(query_start[-1], num_tokens))
    key[:, pad_rows] = 5.0  # padding rows write finite values into SCRATCH
    value[:, pad_rows] = 5.0
    before = cache.clone()
    before[:, :, torch.tensor(slot_mapping)] = math.nan  # the step's slots are unwritten before it
    padded = [t + [PAD_BLOCK] * (width - len(t)) for t in tables]
    max_q = max(n for n, _ in specs)
    meta = PagedAttentionMetadata(
        kv_caches=[before.to(dtype).to(device)],
        block_size=block_size,
        num_tokens=num_tokens,
        num_seqs=len(specs),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        query_start_loc_host=query_start,
        seq_lens_host=seq_lens,
        max_query_len=max_q,
        max_seq_len=max(seq_lens),
        decode_only=all(n == 1 for n, _ in specs) and extra_rows == 0,
    )

    def as_model(t: torch.Tensor) -> torch.Tensor:  # [X, T, D] -> [1, X, T, D] transposed view
        return t.transpose(0, 1).contiguous().transpose(0, 1)[None].to(dtype).to(device)

    return Step(
        meta=meta,
        query=as_model(query.transpose(0, 1)),
        key=as_model(key),
        value=as_model(value),
        cache_before=before,
        specs=specs,
    )


def reference(
    step: Step, scale: float, window: int | None = None, softcap: float | None = None
) -> torch.Tensor:
    """float64 attention of every row: ``[T, H, D]``, zero for padding rows."""
    meta = step.meta
    q = step.query[0].transpose(0, 1).double().cpu()  # [T, H, D]
    cache = step.cache_before.clone()
    cache[0][:, meta.slot_mapping.cpu()] = step.key[0].double().cpu()
    cache[1][:, meta.slot_mapping.cpu()] = step.value[0].double().cpu()
    num_tokens, num_heads, dim = q.shape
    num_kv = cache.shape[1]
    group = num_heads // num_kv
    out = torch.zeros(num_tokens, num_heads, dim, dtype=torch.float64)
    bs = meta.block_size
    tables = meta.block_tables.cpu().tolist()
    for i, (n, ctx) in enumerate(step.specs):
        if ctx < 0:
            continue
        seq_len = ctx + n
        slots = torch.tensor([tables[i][p // bs] * bs + p % bs for p in range(seq_len)])
        k = cache[0][:, slots]  # [Hkv, L, D]
        v = cache[1][:, slots]
        row0 = meta.query_start_loc_host[i]
        for j in range(n):
            p = ctx + j
            lo = 0 if window is None else max(0, p - window + 1)
            for h in range(num_heads):
                kh, vh = k[h // group, lo : p + 1], v[h // group, lo : p + 1]
                s = kh @ q[row0 + j, h] * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                out[row0 + j, h] = torch.softmax(s, 0) @ vh
    return out


def torch_reference(
    step: Step, scale: float, window: int | None = None, softcap: float | None = None
) -> torch.Tensor:
    """The torch path run in float64 on the step's device: ``[T, H, D]`` (fast, any size)."""
    from dataclasses import replace

    from peftserve.engine.attention import torch_paged_attention, write_kv

    meta = step.meta
    cache = step.cache_before.to(meta.slot_mapping.device)
    key, value = step.key[0].double(), step.value[0].double()
    write_kv(cache, key, value, meta.slot_mapping)
    meta64 = replace(meta, kv_caches=[cache], derived={})
    query = step.query[0].double()
    return torch_paged_attention(query, key, value, cache, meta64, scale, window, softcap)
