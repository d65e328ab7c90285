"""Paged attention over a packed step, plugged into transformers' attention interface.

The model runs one packed sequence ``[1, T]`` per step. Every attention layer calls
``paged_attention`` with this step's ``PagedAttentionMetadata`` (passed as the forward
kwarg ``paged_metadata``, which Llama/Mistral/Qwen2 hand down to the attention function).
It writes the step's keys and values into the layer's KV cache and then attends:

* decode tokens (one query token per sequence) all at once: their KV blocks are gathered
  (one ``index_select`` for K and V, into a reused workspace) into a padded batch
  ``[Hkv, Nd, L, D]``, attended with a length mask by two batched matmuls on CPU (faster
  there than SDPA for one-token queries) or SDPA elsewhere; with GQA the query heads of
  one KV head act as that head's queries, so no K/V is repeated;
* prefill chunks one by one with SDPA: a chunk with no cached context attends to its own
  keys (causal), one with context to its gathered blocks (causal with an offset).

Sliding windows (Mistral, Qwen2) arrive as the ``sliding_window`` kwarg and are applied in
the masks. Masks are built once per step (per window) and shared by all layers.

Per layer cache layout: ``[2, num_kv_heads, num_blocks * block_size, head_dim]`` (K, V);
token slot ``s = block * block_size + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "peftserve_paged"
METADATA_KWARG = "paged_metadata"


@dataclass
class DecodeBatch:
    """The step's single-token queries, attended in one padded batch."""

    token_idx: torch.Tensor | None  # [Nd] rows in the packed batch; None: all rows, in order
    block_flat: torch.Tensor  # [Nd * B] padded block tables, flattened
    context_lens: torch.Tensor  # [Nd] tokens each query attends to (itself included)
    num_seqs: int
    max_blocks: int
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    """Sliding window (None: full) -> additive mask [1, Nd, 1, B * block_size], built once per step."""


@dataclass
class PrefillChunk:
    """Rows ``start .. start + length`` of the packed batch: one sequence's prompt chunk."""

    start: int
    length: int
    context: int  # tokens of this sequence already in the cache before the chunk
    block_table: torch.Tensor | None  # [B] when context > 0
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)
    """Sliding window -> bool mask [length, context + length] (None: plain causal)."""


@dataclass
class PagedAttentionMetadata:
    kv_caches: list[torch.Tensor]  # per layer [2, Hkv, num_blocks * block_size, D]
    block_size: int
    slot_mapping: torch.Tensor  # [T] cache slot of each packed token
    num_tokens: int
    device: torch.device
    decode: DecodeBatch | None
    prefills: list[PrefillChunk]
    workspace: torch.Tensor
    """Flat buffer the gathered K/V blocks are copied into (reused by every layer): a fresh
    tensor per layer would be a large allocation, page-faulted in again on every step."""


def paged_attention(
    module: nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function; returns ``([1, T, H, D], None)``."""
    meta: PagedAttentionMetadata = kwargs[METADATA_KWARG]
    cache = meta.kv_caches[module.layer_idx]  # [2, Hkv, S, D]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    cache[0].index_copy_(1, meta.slot_mapping, key[0])
    cache[1].index_copy_(1, meta.slot_mapping, value[0])
    out = query.new_empty(1, meta.num_tokens, query.shape[1], query.shape[3])  # [1, T, H, D]
    if meta.decode is not None:
        _decode(query[0], cache, meta, meta.decode, sliding_window, scale, out[0])
    for chunk in meta.prefills:
        _prefill(query, key, value, cache, meta, chunk, sliding_window, scale, out[0])
    return out, None


def _decode(
    query: torch.Tensor,  # [H, T, D]
    cache: torch.Tensor,  # [2, Hkv, S, D]
    meta: PagedAttentionMetadata,
    dec: DecodeBatch,
    window: int | None,
    scale: float,
    out: torch.Tensor,  # [T, H, D]
) -> None:
    n, num_kv, dim = dec.num_seqs, cache.shape[1], cache.shape[3]
    num_heads = query.shape[0]
    q = query if dec.token_idx is None else query.index_select(1, dec.token_idx)  # [H, Nd, D]
    q = q.view(num_kv, num_heads // num_kv, n, dim).transpose(1, 2)  # [Hkv, Nd, G, D]
    kv = gather_blocks(cache, dec.block_flat, meta.block_size, meta.workspace)  # [2, Hkv, Nd*L, D]
    kv = kv.view(2, num_kv, n, -1, dim)  # [2, Hkv, Nd, L, D]
    mask = _decode_mask(dec, meta.block_size, window, query.dtype)  # [1, Nd, 1, L]
    attend = DECODE_ATTENTION.get(meta.device.type, decode_attention_sdpa)
    o = attend(q, kv[0], kv[1], mask, scale)  # [Hkv, Nd, G, D]
    o = o.permute(1, 0, 2, 3).reshape(n, num_heads, dim)  # [Nd, H, D]
    if dec.token_idx is None:
        out.copy_(o)
    else:
        out.index_copy_(0, dec.token_idx, o)


def decode_attention_sdpa(q, k, v, mask, scale) -> torch.Tensor:
    """q [Hkv, Nd, G, D], k/v [Hkv, Nd, L, D], additive mask [1, Nd, 1, L] -> [Hkv, Nd, G, D]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def decode_attention_matmul(q, k, v, mask, scale) -> torch.Tensor:
    """Same as ``decode_attention_sdpa``; on CPU two batched matmuls beat SDPA's flash kernel
    for one-token queries (about 20% with 8 KV heads, even with 2)."""
    scores = torch.matmul(q, k.transpose(-1, -2))  # [Hkv, Nd, G, L]
    scores.mul_(scale).add_(mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v)  # [Hkv, Nd, G, D]


DECODE_ATTENTION = {"cpu": decode_attention_matmul}
"""Decode attention per device type; SDPA everywhere else."""


def _prefill(
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    cache: torch.Tensor,  # [2, Hkv, S, D]
    meta: PagedAttentionMetadata,
    chunk: PrefillChunk,
    window: int | None,
    scale: float,
    out: torch.Tensor,  # [T, H, D]
) -> None:
    rows = slice(chunk.start, chunk.start + chunk.length)
    q = query[:, :, rows]  # [1, H, n, D]
    if chunk.block_table is None:
        k, v = key[:, :, rows], value[:, :, rows]  # [1, Hkv, n, D]
    else:
        kv = gather_blocks(cache, chunk.block_table, meta.block_size, meta.workspace)
        total = chunk.context + chunk.length
        k, v = kv[0:1, :, :total], kv[1:2, :, :total]  # [1, Hkv, ctx + n, D]
    mask = _prefill_mask(chunk, window, meta.device)  # [n, ctx + n] or None
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )  # [1, H, n, D]
    out[rows] = o[0].transpose(0, 1)


def gather_numel(num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int) -> int:
    """Workspace elements ``gather_blocks`` needs for ``num_blocks`` blocks."""
    return 2 * num_kv_heads * num_blocks * block_size * head_dim


def gather_blocks(
    cache: torch.Tensor,  # [2, Hkv, S, D]
    blocks: torch.Tensor,  # [nb] block ids
    block_size: int,
    workspace: torch.Tensor,  # flat, >= gather_numel(...) elements
) -> torch.Tensor:
    """K and V of ``blocks``, in order: [2, Hkv, nb * block_size, D] (one copy, into the workspace)."""
    _, num_kv, _, dim = cache.shape
    paged = cache.view(2, num_kv, -1, block_size, dim)  # [2, Hkv, num_blocks, bs, D]
    size = gather_numel(num_kv, blocks.numel(), block_size, dim)
    out = workspace[:size].view(2, num_kv, blocks.numel(), block_size, dim)
    torch.index_select(paged, 2, blocks, out=out)
    return out.view(2, num_kv, -1, dim)


def _decode_mask(dec: DecodeBatch, block_size: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    mask = dec.masks.get(window)
    if mask is None:
        kv = torch.arange(dec.max_blocks * block_size, device=dec.context_lens.device)  # [L]
        ctx = dec.context_lens[:, None]  # [Nd, 1]
        keep = kv[None] < ctx  # [Nd, L]
        if window is not None:
            keep &= kv[None] > ctx - 1 - window
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
        mask = mask[None, :, None]  # [1, Nd, 1, L]
        dec.masks[window] = mask
    return mask


def _prefill_mask(chunk: PrefillChunk, window: int | None, device: torch.device) -> torch.Tensor | None:
    if window is not None and chunk.context + chunk.length <= window:
        window = None  # the window covers the whole chunk: plain causal
    if window in chunk.masks:
        return chunk.masks[window]
    mask = None
    if chunk.context or window is not None:
        kv = torch.arange(chunk.context + chunk.length, device=device)  # [ctx + n]
        q_pos = kv[chunk.context :, None]  # [n, 1]
        mask = kv[None] <= q_pos  # [n, ctx + n]
        if window is not None:
            mask &= kv[None] > q_pos - window
    chunk.masks[window] = mask
    return mask


def register() -> None:
    """Make ``peftserve_paged`` known to transformers (idempotent).

    It is deliberately *not* registered with ``AttentionMaskInterface``: for an
    implementation missing there, ``create_causal_mask`` returns None at once, so no
    [T, T] mask (nor the packed-sequence detection, which syncs) is ever built.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)


register()
