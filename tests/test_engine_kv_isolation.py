"""Non-finite KV values of one sequence never reach another (masked padding, reused blocks)."""

from __future__ import annotations

from peftserve.engine.block_manager import RESERVED_BLOCKS
from peftserve.engine.engine import NON_FINITE_ERROR
from tests.engine_helpers import collect, greedy, make_engine, random_prompts, run_to_completion
from tests.tiny_models import make_tiny_model


def _poison(engine, blocks: list[int]) -> None:
    bs = engine.runner.block_size
    for cache in engine.runner.kv_caches:  # [2, Hkv, (num_blocks + RESERVED_BLOCKS) * bs, D]
        for b in blocks:
            cache[:, :, b * bs : (b + 1) * bs] = float("nan")


def test_nan_kv_of_one_sequence_does_not_reach_a_batched_neighbour(tmp_path):
    engine = make_engine(make_tiny_model(tmp_path, "llama"))
    long_prompt, short_prompt = random_prompts((40, 3), seed=1)
    engine.add_request("bad", long_prompt, greedy(8))  # first: it holds the first block handed out
    engine.add_request("good", short_prompt, greedy(8))
    results: dict = {}
    collect(results, engine.step())  # both prefilled; next steps decode them in one batch
    bad = next(s for s in engine.scheduler.running if s.request_id == "bad")
    assert bad.block_table[0] == RESERVED_BLOCKS
    _poison(engine, bad.block_table)  # "good"'s shorter table is padded in the decode batch
    for _ in range(20):
        if not engine.has_unfinished_requests():
            break
        collect(results, engine.step())
    assert results["bad"].last.error == NON_FINITE_ERROR
    assert results["good"].last.finish_reason == "length" and len(results["good"].token_ids) == 8


def test_blocks_freed_with_nan_are_clean_for_their_next_owner(tmp_path):
    engine = make_engine(make_tiny_model(tmp_path, "llama"))
    long_prompt, short_prompt = random_prompts((40, 3), seed=2)
    engine.add_request("bad", long_prompt, greedy(8))
    engine.step()
    bad = next(s for s in engine.scheduler.running if s.request_id == "bad")
    _poison(engine, bad.block_table)
    engine.abort_request("bad")
    engine.step()  # the abort takes effect
    engine.add_request("good", short_prompt, greedy(8))
    results = run_to_completion(engine)
    assert results["good"].last.finish_reason == "length", results["good"].last.error
