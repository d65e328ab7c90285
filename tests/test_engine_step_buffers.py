"""The step buffers and the bucketed, padded decode path (the CPU twin of the CUDA graphs)."""

from __future__ import annotations

import logging

import pytest
import torch

from peftserve.engine.block_manager import PAD_BLOCK
from peftserve.engine.cuda_graphs import decode_buckets
from peftserve.engine.sampling_params import SamplingParams
from peftserve.lora.metadata import segments_of
from peftserve.lora.peft_adapter import load_adapter
from tests.engine_helpers import collect, greedy, make_engine, random_prompts, rel_err
from tests.tiny_models import make_peft_adapter, make_tiny_model

LENGTHS = (3, 17, 5, 30, 9, 1, 12)  # 7 sequences: decode batches of 7, 6, ... pad to 8, 4, 2, 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    model_dir = make_tiny_model(root, "mistral", sliding_window=8)  # GQA and a window
    adapters = {
        "a": make_peft_adapter(model_dir, root / "a", r=4, target_modules="all-linear", seed=1),
        "b": make_peft_adapter(
            model_dir, root / "b", r=8, target_modules=["q_proj", "down_proj"], seed=2
        ),
    }
    return model_dir, adapters


def _engine(setup, padded: bool, **kwargs):
    model_dir, adapters = setup
    engine = make_engine(model_dir, **kwargs)
    for name, path in adapters.items():
        engine.add_lora(name, load_adapter(path, engine.model, 64))
    if padded:
        engine.runner.use_decode_graphs(capture=False)
    return engine


def _run(engine, lengths=LENGTHS, max_tokens=(6, 14, 3, 9, 11, 2, 7), seed=3):
    """Per request: its tokens and the logits of every step it sampled in."""
    loras = [None, "a", "b", "a", None, "b", "a"]
    for i, prompt in enumerate(random_prompts(lengths, seed=seed)):
        engine.add_request(str(i), prompt, greedy(max_tokens[i]), lora_id=loras[i % len(loras)])
    results, logits = {}, {}
    while engine.has_unfinished_requests():
        outs, step_logits = engine.step_with_logits()
        collect(results, outs)
        for rid, row in step_logits.items():
            logits.setdefault(rid, []).append(row)
    assert engine.stats.kv_blocks_used == 0
    return {k: r.token_ids for k, r in results.items()}, logits


def test_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert decode_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert decode_buckets(128)[-3:] == [96, 112, 128]


def test_padded_decode_equals_unpadded(setup):
    want_ids, want_logits = _run(_engine(setup, padded=False))
    engine = _engine(setup, padded=True)
    got_ids, got_logits = _run(engine)
    assert got_ids == want_ids
    for rid, rows in want_logits.items():
        assert len(got_logits[rid]) == len(rows)
        for got, want in zip(got_logits[rid], rows, strict=True):
            assert rel_err(got, want) < 1e-5, rid
    padded = engine.runner.graphs.steps_by_bucket
    assert {8, 4, 2, 1} <= set(padded), padded  # decode batches of 7, 6, 5, 3 ... ran padded
    for cache in engine.runner.kv_caches:  # padding rows wrote to SCRATCH, never to PAD
        bs = engine.runner.block_size
        assert cache[:, :, PAD_BLOCK * bs : (PAD_BLOCK + 1) * bs].abs().sum() == 0


def test_padded_decode_with_preemption_rewrites_block_tables(setup):
    lengths, max_tokens = (40, 31, 17, 26, 9, 33, 12), (24, 20, 24, 18, 24, 22, 24)
    want, _ = _run(_engine(setup, padded=False), lengths, max_tokens, seed=5)
    engine = _engine(setup, padded=True, num_blocks=9, max_model_len=64)
    got, _ = _run(engine, lengths, max_tokens, seed=5)
    assert engine.stats.num_preemptions > 0
    assert got == want


def test_step_buffers_hold_the_varlen_description(setup):
    engine = _engine(setup, padded=True)
    runner = engine.runner
    prompts = random_prompts((5, 20, 3), seed=9)
    for i, (prompt, lora) in enumerate(zip(prompts, ["b", None, "b"], strict=True)):
        engine.add_request(str(i), prompt, greedy(4), lora_id=lora)
    sched = engine.scheduler.schedule()
    inputs = runner.prepare(sched)
    attn = inputs.attn
    assert attn.query_start_loc_host == [0, 20, 25, 28] and attn.seq_lens_host == [20, 5, 3]
    assert attn.query_start_loc.tolist() == attn.query_start_loc_host and not attn.decode_only
    assert inputs.input_ids[0].tolist() == prompts[1] + prompts[0] + prompts[2]  # ordered by slot
    slots = [s.slot for s in sched.seqs for _ in range(sched.num_tokens[sched.seqs.index(s)])]
    meta = runner.lora_manager.meta
    assert (
        meta.host_segments == segments_of(slots) == [(0, 20, 0), (20, 8, meta.host_segments[1][2])]
    )
    assert meta.seg_len.tolist()[:3] == [20, 8, 0]
    tables = attn.block_tables.tolist()
    for row, seq in zip(tables, sched.seqs, strict=True):
        k = len(seq.block_table)
        assert row[:k] == seq.block_table and set(row[k:]) == {PAD_BLOCK}
    assert inputs.bucket is None and inputs.logits_to_keep.tolist() == [19, 24, 27]


def test_a_failed_capture_falls_back_to_eager(setup, caplog):
    """On the CPU every capture fails (no CUDA): one log line, then plain eager steps."""
    want, _ = _run(_engine(setup, padded=False))
    engine = _engine(setup, padded=False)
    engine.runner.use_decode_graphs(capture=False)
    engine.runner.graphs.capture = True  # as on CUDA: the second use of a bucket captures
    with caplog.at_level(logging.WARNING, logger="peftserve.engine.cuda_graphs"):
        got, _ = _run(engine)
    assert got == want
    assert engine.runner.graphs is None  # eager, unpadded from then on
    assert len([r for r in caplog.records if "capture" in r.getMessage()]) == 1


def test_sampling_rows_in_the_buffers(setup):
    engine = _engine(setup, padded=False)
    params = [
        SamplingParams(max_tokens=3, temperature=0.0, logprobs=2),
        SamplingParams(max_tokens=3, temperature=0.7, top_k=5, seed=11),
        SamplingParams(max_tokens=3, temperature=1.3, top_p=0.5),
    ]
    for i, (prompt, p) in enumerate(zip(random_prompts((4, 6, 8), seed=2), params, strict=True)):
        engine.add_request(str(i), prompt, p)
    inputs = engine.runner.prepare(engine.scheduler.schedule())
    st = inputs.sampling
    assert st.temperature.tolist() == pytest.approx([0.0, 0.7, 1.3])
    assert st.top_k.tolist() == [0, 5, 0] and st.top_p.tolist() == pytest.approx([1.0, 1.0, 0.5])
    assert st.seeded_rows.tolist() == [1] and st.logprob_rows.tolist() == [0]
    assert st.host.max_top_k == 5 and st.host.any_top_p and st.host.num_unseeded == 1
    assert st.seed_key.dtype == torch.int64 and 0 <= st.seed_key.item() < 2**32


def test_padded_decode_through_the_triton_attention(setup):
    """The graph path's attention kernel (Triton; the interpreter on CPU) on padded
    decode steps give the tokens of the unpadded torch path."""
    lengths, max_tokens = (3, 9, 1), (3, 2, 3)  # decode batches of 3 and 2: buckets 4 and 2
    want, _ = _run(_engine(setup, padded=False), lengths, max_tokens, seed=7)
    engine = _engine(setup, padded=True, max_num_seqs=8, attention_backend="triton")
    got, _ = _run(engine, lengths, max_tokens, seed=7)
    assert got == want
    assert set(engine.runner.graphs.steps_by_bucket) == {4, 2}
