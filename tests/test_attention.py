"""Paged attention over varlen steps: the torch path (the CPU path and the reference) against
a float64 reference; GQA, sliding windows, soft-capping, block-table holes, padding."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from peftserve.engine.attention import paged_attention
from tests.attention_cases import PADDING, make_step, reference

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
def test_torch_path_matches_float64(heads, window, softcap, specs):
    seed = random.randrange(2**31)
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
