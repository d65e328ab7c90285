"""Paged attention over a packed step, plugged into transformers' attention interface.

The model runs one packed sequence ``[1, T]`` per step. Every attention layer calls the
registered attention function with this step's ``PagedAttentionMetadata`` (the forward
kwarg ``paged_metadata``, which the supported families hand down to the attention
function). It writes the step's keys and values into the layer's KV cache through
``slot_mapping``, then attends, reading K/V from the cache (GQA without repeating K/V,
per-layer ``sliding_window`` and ``softcap`` kwargs, fp32 softmax).

The step is described varlen-style (as flash-attn / vLLM): sequence ``i`` owns the rows
``query_start_loc[i] .. query_start_loc[i + 1]`` of the packed batch and has ``seq_lens[i]``
tokens in the cache after this step's write, the last ``query_len`` of them its queries.
A padding sequence has ``seq_len`` 0: its rows come out zero.

Two implementations, chosen once when the model is loaded (``attention_implementation``):

* ``triton`` (CUDA; the interpreter in tests): ``peftserve.kernels.paged_attention``, one
  launch per layer that reads the block tables in place (split over the context for
  decode-only steps, a CUDA-graph-safe grid);
* ``torch`` (CPU, and the reference): decode tokens attended all at once from a gathered
  padded batch ``[Hkv, Nd, L, D]`` (two batched matmuls on CPU, SDPA elsewhere; GQA by
  treating the query heads of one KV head as its queries); prefill chunks one by one
  with SDPA (manual softmax when a layer soft-caps its logits). What it derives from the
  host mirrors (masks, index tensors) is built once per step and kept in
  ``PagedAttentionMetadata.derived``, shared by all layers.

Window semantics (transformers' ``sliding_window_overlay``): a query at position ``p``
sees key positions ``k`` with ``p - window < k <= p``. Soft-capping (Gemma 2):
``scores = softcap * tanh(scores / softcap)`` after scaling, before the mask.

Per layer cache layout: ``[2, num_kv_heads, num_blocks * block_size, head_dim]`` (K, V);
token slot ``s = block * block_size + offset``. Block 0 is the PAD block (stays zero;
pads block tables) and block 1 the SCRATCH block (padding rows write there; never read):
see ``peftserve.engine.block_manager``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

METADATA_KWARG = "paged_metadata"
ATTN_IMPLEMENTATIONS = {"torch": "peftserve_paged", "triton": "peftserve_paged_triton"}
"""Name registered with transformers' AttentionInterface, per backend."""
ATTN_IMPLEMENTATION = ATTN_IMPLEMENTATIONS["torch"]


@dataclass
class PagedAttentionMetadata:
    """One step of packed, paged attention (see the module docstring); shared by all layers."""

    kv_caches: list[torch.Tensor]  # per layer [2, Hkv, num_blocks * block_size, D]
    block_size: int
    num_tokens: int  # T: rows of the packed batch, padding rows included
    num_seqs: int  # N: sequences, padding sequences included
    slot_mapping: torch.Tensor  # [T] int64 cache slot of each row (padding rows: SCRATCH block)
    query_start_loc: torch.Tensor  # [N + 1] int32; rows of seq i: qsl[i] .. qsl[i + 1]
    seq_lens: torch.Tensor  # [N] int32; cached tokens after this step's write; 0: padding
    block_tables: torch.Tensor  # [N, max_blocks] int32, padded with the PAD block (0)
    query_start_loc_host: list[int]  # [N + 1] host mirror (torch path only)
    seq_lens_host: list[int]  # [N] host mirror (torch path only)
    max_query_len: int  # host upper bounds
    max_seq_len: int
    decode_only: bool  # every query length is 1
    derived: dict = field(default_factory=dict)
    """Per-step tensors derived once by an implementation (masks, index tensors)."""


def write_kv(
    cache: torch.Tensor,  # [2, Hkv, S, D]
    key: torch.Tensor,  # [Hkv, T, D]
    value: torch.Tensor,  # [Hkv, T, D]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Store the step's keys and values at their cache slots."""
    cache[0].index_copy_(1, slot_mapping, key)
    cache[1].index_copy_(1, slot_mapping, value)


def paged_attention(
    module: nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function (torch path); returns ``([1, T, H, D], None)``."""
    meta: PagedAttentionMetadata = kwargs[METADATA_KWARG]
    cache = meta.kv_caches[module.layer_idx]  # [2, Hkv, S, D]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    write_kv(cache, key[0], value[0], meta.slot_mapping)
    out = torch_paged_attention(
        query[0], key[0], value[0], cache, meta, scale, sliding_window, softcap
    )
    return out[None], None


def paged_attention_triton(
    module: nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function (Triton kernel); returns ``([1, T, H, D], None)``."""
    from peftserve import kernels

    meta: PagedAttentionMetadata = kwargs[METADATA_KWARG]
    cache = meta.kv_caches[module.layer_idx]  # [2, Hkv, S, D]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    write_kv(cache, key[0], value[0], meta.slot_mapping)
    out = kernels.paged_attention(
        query[0].transpose(0, 1),  # [T, H, D]
        cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        meta.block_size,
        scale,
        sliding_window=sliding_window,
        softcap=softcap,
        decode_only=meta.decode_only,
        rows_covered=meta.query_start_loc_host[-1],
        check=meta.derived.setdefault("triton_checked", module.layer_idx) == module.layer_idx,
    )  # [T, H, D]: the inputs are checked in the first layer that runs the step
    return out[None], None


# ---- the torch path ---------------------------------------------------------------------------


@dataclass
class DecodeBatch:
    """The step's single-token queries, attended in one padded batch."""

    token_idx: torch.Tensor | None  # [Nd] rows in the packed batch; None: all rows, in order
    block_flat: torch.Tensor  # [Nd * B] padded block tables, flattened
    context_lens: torch.Tensor  # [Nd] tokens each query attends to (itself included)
    num_seqs: int
    max_blocks: int
    masks: dict[tuple[int | None, torch.dtype], torch.Tensor] = field(default_factory=dict)
    """(sliding window or None, dtype) -> additive mask [1, Nd, 1, B * block_size], built once per step."""


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
class TorchPlan:
    """What the torch path derives from the host mirrors, once per step."""

    decode: DecodeBatch | None
    prefills: list[PrefillChunk]
    zero_fill: bool  # some rows belong to no live sequence (padding): they must come out 0


def torch_plan(meta: PagedAttentionMetadata) -> TorchPlan:
    """The step's plan, built on first use and kept in ``meta.derived``."""
    plan = meta.derived.get("torch")
    if plan is None:
        plan = meta.derived["torch"] = _build_plan(meta)
    return plan


def _build_plan(meta: PagedAttentionMetadata) -> TorchPlan:
    qsl, lens, bs = meta.query_start_loc_host, meta.seq_lens_host, meta.block_size
    device = meta.slot_mapping.device
    dec_seqs: list[int] = []
    prefills: list[PrefillChunk] = []
    covered = 0
    for i in range(meta.num_seqs):
        start, n, seq_len = qsl[i], qsl[i + 1] - qsl[i], lens[i]
        if n == 0 or seq_len == 0:
            continue  # a padding sequence
        covered += n
        if n == 1:
            dec_seqs.append(i)
            continue
        context = seq_len - n
        table = meta.block_tables[i, : -(-seq_len // bs)] if context else None
        prefills.append(PrefillChunk(start=start, length=n, context=context, block_table=table))
    decode = None
    if dec_seqs:
        rows = [qsl[i] for i in dec_seqs]
        context = [lens[i] for i in dec_seqs]
        max_blocks = -(-max(context) // bs)
        tables = meta.block_tables[:, :max_blocks]
        if dec_seqs != list(range(meta.num_seqs)):
            tables = tables.index_select(0, _tensor(dec_seqs, device))
        decode = DecodeBatch(
            token_idx=None if rows == list(range(meta.num_tokens)) else _tensor(rows, device),
            block_flat=tables.reshape(-1),
            context_lens=_tensor(context, device),
            num_seqs=len(dec_seqs),
            max_blocks=max_blocks,
        )
    return TorchPlan(decode=decode, prefills=prefills, zero_fill=covered < meta.num_tokens)


def _tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def torch_paged_attention(
    query: torch.Tensor,  # [H, T, D]
    key: torch.Tensor,  # [Hkv, T, D] this step's keys (already written to the cache)
    value: torch.Tensor,  # [Hkv, T, D]
    cache: torch.Tensor,  # [2, Hkv, S, D]
    meta: PagedAttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of every row of the step (the reference implementation); returns ``[T, H, D]``."""
    plan = torch_plan(meta)
    num_heads, _, dim = query.shape
    alloc = query.new_zeros if plan.zero_fill else query.new_empty
    out = alloc(meta.num_tokens, num_heads, dim)  # [T, H, D]
    if plan.decode is not None:
        _decode(query, cache, meta.block_size, plan.decode, window, softcap, scale, out)
    for chunk in plan.prefills:
        _prefill(query, key, value, cache, meta.block_size, chunk, window, softcap, scale, out)
    return out


def _decode(
    query: torch.Tensor,  # [H, T, D]
    cache: torch.Tensor,  # [2, Hkv, S, D]
    block_size: int,
    dec: DecodeBatch,
    window: int | None,
    softcap: float | None,
    scale: float,
    out: torch.Tensor,  # [T, H, D]
) -> None:
    n, num_kv, dim = dec.num_seqs, cache.shape[1], cache.shape[3]
    num_heads = query.shape[0]
    q = query if dec.token_idx is None else query.index_select(1, dec.token_idx)  # [H, Nd, D]
    q = q.reshape(num_kv, num_heads // num_kv, n, dim).transpose(1, 2)  # [Hkv, Nd, G, D]
    kv = gather_blocks(
        cache, dec.block_flat, block_size, _workspace(cache, dec.block_flat.numel(), block_size)
    )
    kv = kv.view(2, num_kv, n, -1, dim)  # [2, Hkv, Nd, L, D]
    if softcap is not None:
        mask = _decode_mask(dec, block_size, window, torch.float32)  # [1, Nd, 1, L]
        o = decode_attention_matmul(q, kv[0], kv[1], mask, scale, softcap)
    else:
        mask = _decode_mask(dec, block_size, window, query.dtype)
        attend = DECODE_ATTENTION.get(query.device.type, decode_attention_sdpa)
        o = attend(q, kv[0], kv[1], mask, scale)  # [Hkv, Nd, G, D]
    o = o.permute(1, 0, 2, 3).reshape(n, num_heads, dim)  # [Nd, H, D]
    if dec.token_idx is None:
        out.copy_(o)
    else:
        out.index_copy_(0, dec.token_idx, o)


def decode_attention_sdpa(q, k, v, mask, scale) -> torch.Tensor:
    """q [Hkv, Nd, G, D], k/v [Hkv, Nd, L, D], additive mask [1, Nd, 1, L] -> [Hkv, Nd, G, D]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def decode_attention_matmul(q, k, v, mask, scale, softcap: float | None = None) -> torch.Tensor:
    """Same as ``decode_attention_sdpa`` (plus soft-capping); on CPU two batched matmuls beat
    SDPA's flash kernel for one-token queries (about 20% with 8 KV heads, even with 2)."""
    scores = torch.matmul(q, k.transpose(-1, -2))  # [Hkv, Nd, G, L]
    if softcap is not None:
        scores = scores.float()  # soft-capping in fp32 (its mask is fp32 too)
    scores = _softcap(scores.mul_(scale), softcap).add_(mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v)  # [Hkv, Nd, G, D]


DECODE_ATTENTION = {"cpu": decode_attention_matmul}
"""Decode attention per device type; SDPA everywhere else."""


def _softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)`` in place (Gemma 2's attention logit soft-capping)."""
    if softcap is None:
        return scores
    return scores.div_(softcap).tanh_().mul_(softcap)


def _prefill(
    query: torch.Tensor,  # [H, T, D]
    key: torch.Tensor,  # [Hkv, T, D]
    value: torch.Tensor,  # [Hkv, T, D]
    cache: torch.Tensor,  # [2, Hkv, S, D]
    block_size: int,
    chunk: PrefillChunk,
    window: int | None,
    softcap: float | None,
    scale: float,
    out: torch.Tensor,  # [T, H, D]
) -> None:
    rows = slice(chunk.start, chunk.start + chunk.length)
    q = query[:, rows]  # [H, n, D]
    if chunk.block_table is None:
        k, v = key[:, rows], value[:, rows]  # [Hkv, n, D]
    else:
        ws = _workspace(cache, chunk.block_table.numel(), block_size)
        kv = gather_blocks(cache, chunk.block_table, block_size, ws)
        total = chunk.context + chunk.length
        k, v = kv[0, :, :total], kv[1, :, :total]  # [Hkv, ctx + n, D]
    mask = _prefill_mask(chunk, window, query.device)  # [n, ctx + n] or None
    if softcap is None:
        o = F.scaled_dot_product_attention(
            q[None],
            k[None],
            v[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )[0]  # [H, n, D]
    else:
        o = _attention_softcap(q, k, v, mask, scale, softcap)
    out[rows] = o.transpose(0, 1)


def _attention_softcap(
    q: torch.Tensor,  # [H, n, D]
    k: torch.Tensor,  # [Hkv, L, D]
    v: torch.Tensor,  # [Hkv, L, D]
    mask: torch.Tensor | None,  # [n, L] bool, None: causal with L == n
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Causal attention with soft-capped logits (SDPA has no soft-capping); returns [H, n, D]."""
    num_heads, n, dim = q.shape
    num_kv, length, _ = k.shape
    if mask is None:
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril_()
    qg = q.reshape(num_kv, num_heads // num_kv * n, dim)  # [Hkv, G * n, D]
    scores = _softcap(
        torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scale), softcap
    )  # [Hkv, G*n, L]
    scores = scores.view(num_kv, -1, n, length).masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(num_kv, -1, length)
    return torch.matmul(probs, v).view(num_heads, n, dim)


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


_WORKSPACES: dict[tuple[torch.device, torch.dtype, bool], torch.Tensor] = {}
"""The flat buffer gathered K/V blocks are copied into, per (device, dtype, inference mode),
reused by every layer and step and grown, never shrunk: a fresh tensor per layer would be a
large allocation, page-faulted in again on every step. One made under ``inference_mode`` is
an inference tensor, which cannot be written outside it (a test after a served step)."""


def _workspace(cache: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    need = gather_numel(cache.shape[1], num_blocks, block_size, cache.shape[3])
    key = (cache.device, cache.dtype, torch.is_inference_mode_enabled())
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < need:
        with torch.inference_mode(False):  # a normal tensor: written in and out of inference mode
            buf = _WORKSPACES[key] = torch.empty(
                need + need // 2, dtype=cache.dtype, device=cache.device
            )
    return buf


def _decode_mask(
    dec: DecodeBatch, block_size: int, window: int | None, dtype: torch.dtype
) -> torch.Tensor:
    mask = dec.masks.get((window, dtype))
    if mask is None:
        kv = torch.arange(dec.max_blocks * block_size, device=dec.context_lens.device)  # [L]
        ctx = dec.context_lens[:, None]  # [Nd, 1]
        keep = kv[None] < ctx  # [Nd, L]
        if window is not None:
            keep &= kv[None] > ctx - 1 - window
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(
            ~keep, float("-inf")
        )
        mask = mask[None, :, None]  # [1, Nd, 1, L]
        dec.masks[(window, dtype)] = mask
    return mask


def _prefill_mask(
    chunk: PrefillChunk, window: int | None, device: torch.device
) -> torch.Tensor | None:
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


# ---- selection ------------------------------------------------------------------------------


def attention_implementation(backend: str, device: torch.device) -> str:
    """The registered attention function for ``backend`` (auto: triton on CUDA, torch elsewhere)."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention backend {backend!r}; choose auto, torch or triton")
    if backend == "triton" and not _triton_available():
        raise ValueError("attention_backend=triton needs the triton package (pip install triton)")
    if (
        backend == "triton"
        and device.type != "cuda"
        and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    ):
        raise ValueError(
            "attention_backend=triton needs a CUDA device (or TRITON_INTERPRET=1, for tests)"
        )
    return ATTN_IMPLEMENTATIONS[backend]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def register() -> None:
    """Make the paged attention functions known to transformers (idempotent).

    They are deliberately *not* registered with ``AttentionMaskInterface``: for an
    implementation missing there, ``create_causal_mask`` returns None at once, so no
    [T, T] mask (nor the packed-sequence detection, which syncs) is ever built.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATIONS["torch"], paged_attention)
    AttentionInterface.register(ATTN_IMPLEMENTATIONS["triton"], paged_attention_triton)


register()
