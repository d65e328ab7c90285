"""The packed, paged forward against Hugging Face's own forward and generate."""

from __future__ import annotations

import json

import pytest
import torch

from peftserve.engine.attention import (
    decode_attention_matmul,
    decode_attention_sdpa,
    gather_blocks,
    gather_numel,
)
from tests.engine_helpers import (
    PROMPT_LENGTHS,
    generate_all,
    greedy,
    hf_greedy,
    hf_last_logits,
    load_hf,
    make_engine,
    random_prompts,
    rel_err,
)
from tests.tiny_models import FAMILIES, make_tiny_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: make_tiny_model(root, family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_logits_match_hf(model_dirs, family):
    engine = make_engine(model_dirs[family])
    prompts = random_prompts(PROMPT_LENGTHS, seed=1)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, greedy())
    _, logits = engine.step_with_logits()
    assert len(logits) == len(prompts) and engine.stats.steps == 1  # all prefills in one step
    ref = load_hf(model_dirs[family])
    for i, prompt in enumerate(prompts):
        assert rel_err(logits[str(i)], hf_last_logits(ref, prompt)) < 1e-4, (family, len(prompt))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate(model_dirs, family):
    engine = make_engine(model_dirs[family])
    prompts = random_prompts(PROMPT_LENGTHS, seed=2)
    results = generate_all(engine, prompts, greedy(16))
    ref = load_hf(model_dirs[family])
    tokenizer = engine.tokenizer
    for i, prompt in enumerate(prompts):
        res = results[str(i)]
        assert res.token_ids == hf_greedy(ref, prompt, 16), (family, len(prompt))
        assert res.text == tokenizer.decode(res.token_ids, skip_special_tokens=True)
        assert res.last.finish_reason == "length" and res.last.completion_tokens == 16


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("mistral", dict(sliding_window=8)),
        ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    ],
)
def test_sliding_window_matches_hf(tmp_path, family, overrides):
    model_dir = make_tiny_model(tmp_path, family, **overrides)
    # A tiny token budget also runs windowed prefill chunks with cached context.
    engine = make_engine(model_dir, max_num_batched_tokens=32, max_num_seqs=4)
    prompts = random_prompts((3, 9, 20, 37), seed=3)
    results = generate_all(engine, prompts, greedy(16))
    ref = load_hf(model_dir)
    for i, prompt in enumerate(prompts):
        assert results[str(i)].token_ids == hf_greedy(ref, prompt, 16), (family, len(prompt))


def test_missing_model_dir_is_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as info:
        make_engine(tmp_path / "nope")
    assert "\n" not in str(info.value)


def test_unsupported_family_is_refused(model_dirs, tmp_path):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    config = json.loads((model_dirs["llama"] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: llama, mistral, qwen2"):
        make_engine(bad)


def test_kv_budget_below_one_sequence_is_refused(model_dirs):
    with pytest.raises(ValueError, match="raise kv_cache_memory_gb or lower max_model_len"):
        make_engine(model_dirs["llama"], num_blocks=2, max_model_len=64)


def test_decode_attention_paths_agree():
    """The CPU matmul path and the SDPA path (CUDA) compute the same attention."""
    torch.manual_seed(0)
    num_kv, n, group, length, dim = 2, 5, 3, 48, 16
    q = torch.randn(num_kv, n, group, dim)
    k, v = torch.randn(2, num_kv, n, length, dim)
    ctx = torch.tensor([1, 7, 48, 20, 33])
    keep = torch.arange(length)[None] < ctx[:, None]  # [N, L]
    mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))[None, :, None]
    want = decode_attention_sdpa(q, k, v, mask, dim**-0.5)
    got = decode_attention_matmul(q, k, v, mask, dim**-0.5)
    assert torch.allclose(got, want, atol=1e-5)


def test_gather_blocks_reads_blocks_in_table_order():
    num_kv, blocks, size, dim = 2, 6, 4, 3
    cache = torch.randn(2, num_kv, blocks * size, dim)
    table = torch.tensor([4, 1, 5])
    workspace = torch.empty(gather_numel(num_kv, 3, size, dim) + 7)
    got = gather_blocks(cache, table, size, workspace)  # [2, Hkv, 12, D]
    want = torch.cat([cache[:, :, b * size : (b + 1) * size] for b in table.tolist()], dim=2)
    assert torch.equal(got, want)
