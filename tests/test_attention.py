"""Paged attention over varlen steps against a float64 reference: the torch path (the CPU
path and the reference) and the Triton kernel (under TRITON_INTERPRET=1 without CUDA);
GQA, sliding windows, soft-capping, block-table holes, context lengths 1 and exactly a
block, padding sequences and rows, decode splits, mixed decode and prefill.
``-m gpu`` runs the large matrix and the CUDA-graph replay on CUDA."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from peftserve import kernels  # noqa: E402
from peftserve.engine import attention  # noqa: E402
from peftserve.engine.attention import paged_attention, paged_attention_triton, write_kv  # noqa: E402
from tests.attention_cases import PADDING, make_step, reference, torch_reference  # noqa: E402

LAYER = SimpleNamespace(layer_idx=0)
# (query_len, context_len): context lengths 1 and exactly a block (16), decode and prefill
# chunks with and without cached context, padding sequences in between.
MIXED = [
    (1, 0),
    (7, 0),
    PADDING,
    (1, 15),
    (5, 9),
    (1, 16),
    (16, 0),
    (3, 1),
    (1, 40),
    PADDING,
    (1, 31),
]
DECODE = [(1, 0), (1, 15), PADDING, (1, 16), (1, 40), (1, 3)]
HEADS = [(4, 2), (2, 2), (6, 2)]  # (H, Hkv): GQA, MHA, a group of 3


def _check(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    err = ((got.double().cpu() - want).abs().max() / want.abs().max()).item()
    assert err < tol and not got.isnan().any(), f"{what}: rel err {err:.2e}"


@pytest.mark.parametrize("heads", HEADS, ids=[f"H{h}-kv{k}" for h, k in HEADS])
@pytest.mark.parametrize("window", [None, 5, 16], ids=["full", "w5", "w16"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "cap2"])
@pytest.mark.parametrize("specs", [MIXED, DECODE], ids=["mixed", "decode"])
def test_torch_path_matches_float64(heads, window, softcap, specs, seed):
    num_heads, num_kv = heads
    step = make_step(
        specs,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=16,
        block_size=16,
        seed=seed,
        extra_rows=2 if specs is MIXED else 0,
    )
    scale = 0.3
    out, _ = paged_attention(
        LAYER,
        step.query,
        step.key,
        step.value,
        None,
        scaling=scale,
        sliding_window=window,
        softcap=softcap,
        paged_metadata=step.meta,
    )
    want = reference(step, scale, window, softcap)
    _check(out[0], want, 1e-5, f"seed {seed}")
    cache = step.meta.kv_caches[0]
    slots = step.meta.slot_mapping
    assert torch.equal(cache[0][:, slots], step.key[0]) or not step.meta.decode_only


def test_padding_rows_are_zero_and_scratch_is_written():
    step = make_step(
        [PADDING, (3, 2), PADDING],
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        block_size=4,
        seed=1,
        extra_rows=3,
    )
    out, _ = paged_attention(
        LAYER, step.query, step.key, step.value, None, paged_metadata=step.meta
    )
    rows = torch.ones(step.meta.num_tokens, dtype=torch.bool)
    rows[1:4] = False
    assert torch.equal(out[0][rows], torch.zeros_like(out[0][rows]))
    assert not out.isnan().any()


def test_torch_path_runs_outside_inference_mode_after_a_served_step():
    """The K/V gather workspace made under inference_mode (a served step) is not reused by a
    call outside it (an inference tensor cannot be written there)."""
    step = make_step(DECODE, num_heads=4, num_kv_heads=2, head_dim=8, block_size=16, seed=3)
    with torch.inference_mode():
        served, _ = paged_attention(LAYER, step.query, step.key, step.value, None, paged_metadata=step.meta)
    out, _ = paged_attention(LAYER, step.query, step.key, step.value, None, paged_metadata=step.meta)
    assert torch.equal(out, served)


def test_masks_are_built_once_per_step():
    step = make_step(MIXED, num_heads=4, num_kv_heads=2, head_dim=8, block_size=16, seed=2)
    for _ in range(2):
        paged_attention(
            LAYER,
            step.query,
            step.key,
            step.value,
            None,
            sliding_window=5,
            paged_metadata=step.meta,
        )
    plan = step.meta.derived["torch"]
    first = plan.decode.masks[(5, torch.float32)]
    paged_attention(
        LAYER, step.query, step.key, step.value, None, sliding_window=5, paged_metadata=step.meta
    )
    assert plan.decode.masks[(5, torch.float32)] is first


# ---- the Triton kernel ------------------------------------------------------------------------

DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
PREFILL = [(40, 0), (33, 20), (1, 7), (17, 16)]  # several query tiles per sequence
# id -> (specs, (H, Hkv), window, softcap, dtype, block_size, head_dim, num_splits)
TRITON_CASES = {
    "decode-gqa": (DECODE, (4, 2), None, None, torch.float32, 16, 16, None),
    "decode-split3-window7": (DECODE, (6, 2), 7, None, torch.float32, 16, 16, 3),
    "decode-split4-softcap-kv1": (DECODE, (4, 1), None, 1.5, torch.float32, 16, 16, 4),
    "decode-fp16-split2-bs4": (DECODE, (4, 2), None, 2.0, torch.float16, 4, 16, 2),
    "mixed-gqa": (MIXED, (4, 2), None, None, torch.float32, 16, 16, None),
    "mixed-window5-softcap-g3": (MIXED, (6, 2), 5, 2.0, torch.float32, 16, 16, None),
    "mixed-mha-window16-bs8-d24": (MIXED, (2, 2), 16, None, torch.float32, 8, 24, None),
    "mixed-bf16-window5": (MIXED, (4, 2), 5, None, torch.bfloat16, 16, 16, None),
    "prefill-ctx-g8": (PREFILL, (8, 1), None, None, torch.float32, 16, 16, None),
}


def run_triton_case(
    specs, heads, window, softcap, dtype, block_size, head_dim, splits, seed, extra_rows=0
):
    """Triton vs the torch path in ``dtype`` and vs float64; the seed is in every message."""
    num_heads, num_kv = heads
    decode = all(n == 1 for n, _ in specs)
    step = make_step(specs, num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim,
                     block_size=block_size, seed=seed, dtype=dtype, device=DEVICE,
                     extra_rows=0 if decode else extra_rows)  # fmt: skip
    meta, scale = step.meta, head_dim**-0.5
    cache = meta.kv_caches[0]
    write_kv(cache, step.key[0], step.value[0], meta.slot_mapping)
    got = kernels.paged_attention(
        step.query[0].transpose(0, 1), cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        block_size, scale, sliding_window=window, softcap=softcap, decode_only=meta.decode_only,
        rows_covered=meta.query_start_loc_host[-1], num_splits=splits,
    )  # fmt: skip
    assert not got.isnan().any(), f"seed {seed}: NaN in the output"
    want64 = torch_reference(step, scale, window, softcap)
    _check(got, want64.cpu(), TOL[dtype], f"seed {seed}: triton vs float64")
    torch_out = paged_attention(
        LAYER, step.query, step.key, step.value, None, scaling=scale, sliding_window=window,
        softcap=softcap, paged_metadata=meta,
    )[0][0]  # fmt: skip
    _check(got, torch_out.double().cpu(), 2 * TOL[dtype], f"seed {seed}: triton vs torch path")
    return step, got


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_matches_torch_and_float64(case, seed):
    run_triton_case(*TRITON_CASES[case], seed=seed, extra_rows=2)


def test_triton_small_reference_case(seed):
    """The slow per-query float64 loop (independent of the torch path) on one mixed step."""
    step, got = run_triton_case(MIXED[:6], (4, 2), 5, 2.0, torch.float32, 16, 16, None, seed=seed)
    _check(got, reference(step, 16**-0.5, 5, 2.0), 1e-5, f"seed {seed}: triton vs float64 loop")


def test_triton_padding_rows_and_unread_tables():
    """Padding sequences and rows owned by nobody come out exactly zero; NaN in the
    block-table padding (PAD block poisoned) and in unowned blocks is never read."""
    step = make_step([PADDING, (3, 2), (1, 5), PADDING], num_heads=4, num_kv_heads=2, head_dim=16,
                     block_size=4, seed=7, device=DEVICE, extra_rows=3, table_width=6)  # fmt: skip
    meta = step.meta
    cache = meta.kv_caches[0]
    write_kv(cache, step.key[0], step.value[0], meta.slot_mapping)
    cache[:, :, :4] = float("nan")  # the PAD block: padding of block tables must stay unread
    got = kernels.paged_attention(
        step.query[0].transpose(0, 1), cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        4, 0.25, rows_covered=meta.query_start_loc_host[-1],
    )  # fmt: skip
    live = torch.zeros(meta.num_tokens, dtype=torch.bool)
    live[1:5] = True
    assert torch.equal(got[~live], torch.zeros_like(got[~live]))
    assert not got.isnan().any()


def test_triton_attention_function_and_input_checks():
    step = make_step(
        DECODE, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, seed=3, device=DEVICE
    )
    out, _ = paged_attention_triton(
        LAYER, step.query, step.key, step.value, None, paged_metadata=step.meta
    )
    _check(out[0], torch_reference(step, 0.25).cpu(), 1e-5, "attention-interface function")
    meta = step.meta
    q = step.query[0].transpose(0, 1)
    args = (meta.block_tables, meta.seq_lens, meta.query_start_loc, 16, 0.25)
    with pytest.raises(ValueError, match="int32"):
        kernels.paged_attention(q, meta.kv_caches[0], meta.block_tables.long(), *args[1:])
    with pytest.raises(ValueError, match="one float dtype"):
        kernels.paged_attention(q.half(), meta.kv_caches[0], *args)
    with pytest.raises(ValueError, match="power of two"):
        kernels.paged_attention(q, meta.kv_caches[0], *args[:3], 12, 0.25)


# (H, Hkv, head dim): Llama-2 MHA, Llama-3 GQA, Qwen2 (group of 7), a single KV head,
# Phi-3 (head dim 96), Gemma (head dim 256).
GPU_SHAPES = [(8, 8, 64), (32, 8, 128), (28, 4, 128), (16, 1, 128), (32, 8, 96), (8, 2, 256)]


def _gpu_matrix() -> list:
    cases = []
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    for i, ((h, kv, dim), variant) in enumerate((s, v) for s in GPU_SHAPES for v in range(2)):
        window, softcap = ((None, None), (300, 30.0), (300, None), (None, 30.0))[(i + i // 4) % 4]
        dtype, block_size = dtypes[i % 3], (16, 32)[variant]
        rng = random.Random(i)
        decode = [
            (1, rng.choice([0, 15, 16, 511, 1000, 2100])) for _ in range(rng.choice([1, 7, 33]))
        ]
        decode[rng.randrange(len(decode))] = PADDING
        mixed = decode[:5] + [(rng.choice([2, 77, 300]), rng.choice([0, 1, 700])) for _ in range(3)]
        for kind, specs in (("decode", decode), ("mixed", mixed)):
            split = (None, 1, 5)[i % 3] if kind == "decode" else None
            cases.append(pytest.param(
                specs, (h, kv), window, softcap, dtype, block_size, dim, split,
                id=f"{kind}-H{h}kv{kv}-d{dim}-w{window}-cap{softcap}-{str(dtype)[6:]}-bs{block_size}-s{split}",
            ))  # fmt: skip
    return cases


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("specs", "heads", "window", "softcap", "dtype", "block_size", "head_dim", "splits"),
                         _gpu_matrix())  # fmt: skip
def test_triton_gpu_matrix(
    specs, heads, window, softcap, dtype, block_size, head_dim, splits, seed
):
    run_triton_case(specs, heads, window, softcap, dtype, block_size, head_dim, splits,
                    seed=seed, extra_rows=3)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_triton_decode_replays_in_a_cuda_graph(seed):
    """A decode launch captured once gives the eager result for other lengths and tables."""
    rng = random.Random(seed)
    width, num_seqs = 64, 16

    def step_of(seed_):
        r = random.Random(seed_)
        specs = [(1, r.randrange(0, width * 16 - 1)) for _ in range(num_seqs)]
        return make_step(specs, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, seed=seed_,
                         dtype=torch.bfloat16, device=DEVICE, table_width=width,
                         total_blocks=num_seqs * width + 8)  # fmt: skip

    first = step_of(rng.randrange(2**31))
    meta = first.meta
    q = first.query[0].transpose(0, 1).clone()
    cache = torch.zeros_like(meta.kv_caches[0], memory_format=torch.contiguous_format)
    bufs = [meta.block_tables.clone(), meta.seq_lens.clone(), meta.query_start_loc.clone()]
    kwargs = dict(decode_only=True, num_splits=None)
    kernels.paged_attention(q, cache, *bufs, 16, 0.1, **kwargs)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.paged_attention(q, cache, *bufs, 16, 0.1, **kwargs)
    for _ in range(3):
        step = step_of(rng.randrange(2**31))
        m = step.meta
        write_kv(m.kv_caches[0], step.key[0], step.value[0], m.slot_mapping)
        cache.copy_(m.kv_caches[0])
        q.copy_(step.query[0].transpose(0, 1))
        for buf, new in zip(bufs, (m.block_tables, m.seq_lens, m.query_start_loc), strict=True):
            buf.copy_(new)
        graph.replay()
        eager = kernels.paged_attention(q, cache, *bufs, 16, 0.1, **kwargs)
        assert torch.equal(out, eager), f"seed {seed}"


# ---- the kernel inside the engine -----------------------------------------------------------


@pytest.mark.parametrize(
    "family, overrides",
    [("llama", {}), ("mistral", dict(sliding_window=8))],
    ids=["llama", "mistral-window8"],
)
def test_engine_with_triton_attention_matches_hf(tmp_path, family, overrides):
    """Chunked prefill with cached context, mixed prefill+decode steps and decode-only
    steps through the Triton kernel (the interpreter on CPU) give HF's greedy tokens."""
    from tests.engine_helpers import (
        generate_all,
        greedy,
        hf_greedy,
        load_hf,
        make_engine,
        random_prompts,
    )
    from tests.tiny_models import make_tiny_model

    model_dir = make_tiny_model(tmp_path, family, **overrides)
    engine = make_engine(
        model_dir, max_num_batched_tokens=24, max_num_seqs=4, attention_backend="triton"
    )
    assert engine.runner.model.config._attn_implementation == "peftserve_paged_triton"
    prompts = random_prompts((3, 20, 9, 33), seed=4)
    results = generate_all(engine, prompts, greedy(4))
    ref = load_hf(model_dir)
    for i, prompt in enumerate(prompts):
        assert results[str(i)].token_ids == hf_greedy(ref, prompt, 4), (family, len(prompt))


def test_workspace_made_in_inference_mode_serves_outside_it(monkeypatch):
    """The torch path's shared gather buffer is a normal tensor whichever mode made it."""
    monkeypatch.setattr(attention, "_WORKSPACES", {})
    step = make_step(
        [(1, 40), (3, 300)], num_heads=4, num_kv_heads=2, head_dim=8, block_size=16, seed=9
    )
    with torch.inference_mode():
        paged_attention(LAYER, step.query, step.key, step.value, None, paged_metadata=step.meta)
    step = make_step(
        [(1, 45), (3, 200)], num_heads=4, num_kv_heads=2, head_dim=8, block_size=16, seed=10
    )
    out, _ = paged_attention(
        LAYER, step.query, step.key, step.value, None, paged_metadata=step.meta
    )
    _check(out[0], reference(step, 8**-0.5), 1e-5, "outside inference mode")
