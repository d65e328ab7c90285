"""Block manager, scheduler policy, chunked prefill, preemption, queue bounds and aborts."""

from __future__ import annotations

import pytest

from peftserve.config import SchedulerConfig
from peftserve.engine.block_manager import RESERVED_BLOCKS, BlockManager
from peftserve.engine.engine import QueueFull, UnknownAdapter
from peftserve.engine.sampling_params import InvalidParameter, SamplingParams
from peftserve.engine.scheduler import Scheduler
from peftserve.engine.sequence import Sequence, SequenceStatus
from tests.engine_helpers import generate_all, greedy, make_engine, random_prompts
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m"), "llama")


@pytest.fixture(scope="module")
def reference(model_dir):
    """Unconstrained greedy and seeded-sampling outputs of the workload below."""
    return generate_all(make_engine(model_dir), *_workload())


def _workload():
    prompts = random_prompts((5, 40, 17, 30, 9, 26, 33, 12, 21, 38), seed=4)
    params = [
        greedy(24) if i % 2 else SamplingParams(max_tokens=24, temperature=0.9, top_k=20, seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    return prompts, params


def _seq(rid: str, n: int, slot: int = 0) -> Sequence:
    return Sequence(rid, list(range(4, 4 + n)), n, SamplingParams(), slot=slot)


# ---- block manager and scheduler units ------------------------------------------------------


def test_block_manager_allocate_append_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = _seq("a", 5)
    assert bm.blocks_needed(seq, 5) == 2 and bm.can_allocate(seq, 5)
    bm.allocate(seq, 5)
    assert seq.block_table == [RESERVED_BLOCKS, RESERVED_BLOCKS + 1] and bm.num_free_blocks == 2
    bm.allocate(seq, 8)  # still fits the two blocks
    assert len(seq.block_table) == 2
    bm.allocate(seq, 9)  # appends one block
    assert len(seq.block_table) == 3 and bm.num_used_blocks == 3
    assert not bm.can_allocate(seq, 17)
    with pytest.raises(RuntimeError):
        bm.allocate(seq, 17)
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 4


def test_step_is_ordered_by_slot_and_bounded():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), BlockManager(64, 4))
    for i, slot in enumerate([3, 0, 2, 3, 1, 0]):
        sched.add(_seq(str(i), 5, slot))
    out = sched.schedule()
    assert [s.slot for s in out.seqs] == sorted(s.slot for s in out.seqs)
    assert len(out.seqs) == 4 and len(sched.waiting) == 2  # max_num_seqs
    assert {s.request_id for s in out.seqs} == {"0", "1", "2", "3"}  # first come, first served


def test_chunked_prefill_shares_steps_with_decodes():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8), BlockManager(64, 4))
    short, long = _seq("short", 3), _seq("long", 20)
    sched.add(short)
    sched.add(long)
    out = sched.schedule()
    assert out.num_tokens == [3, 5]  # the long prompt gets the rest of the budget
    for seq, n in zip(out.seqs, out.num_tokens, strict=True):
        seq.num_computed_tokens += n
    short.token_ids.append(7)  # short sampled a token; long is mid-prefill
    out = sched.schedule()
    assert out.num_tokens == [1, 7] and out.total_tokens == 8


def test_preemption_frees_newest_and_requeues_it_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), bm)
    a, b = _seq("a", 8), _seq("b", 8)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert len(out.seqs) == 2 and bm.num_free_blocks == 0
    for seq in (a, b):
        seq.num_computed_tokens = 8
        seq.token_ids.append(9)  # both need a third block now
    out = sched.schedule()
    assert out.seqs == [a] and out.num_preempted == 1
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert sched.waiting[0] is b and b.num_tokens == 9  # generated tokens kept for recompute


# ---- the engine under constraints -----------------------------------------------------------


def test_chunked_prefill_gives_same_outputs(model_dir, reference):
    engine = make_engine(model_dir, max_num_batched_tokens=8, max_num_seqs=8)
    sizes = []
    schedule = engine.scheduler.schedule

    def spy():
        out = schedule()
        sizes.append((out.total_tokens, sorted(out.num_tokens)))
        return out

    engine.scheduler.schedule = spy
    results = generate_all(engine, *_workload())
    assert {k: r.token_ids for k, r in results.items()} == {k: r.token_ids for k, r in reference.items()}
    assert max(total for total, _ in sizes) <= 8
    assert any(n[0] == 1 and n[-1] > 1 for _, n in sizes)  # a decode and a prefill chunk together


def test_preemption_by_recompute_gives_same_outputs(model_dir, reference):
    engine = make_engine(model_dir, num_blocks=8, max_model_len=64)
    results = generate_all(engine, *_workload())
    assert engine.stats.num_preemptions > 0
    assert {k: r.token_ids for k, r in results.items()} == {k: r.token_ids for k, r in reference.items()}
    assert {k: r.text for k, r in results.items()} == {k: r.text for k, r in reference.items()}


def test_queue_full(model_dir):
    engine = make_engine(model_dir, max_waiting=2, max_num_seqs=2)
    engine.add_request("a", [5, 6], greedy(2))
    engine.add_request("b", [5, 6], greedy(2))
    with pytest.raises(QueueFull):
        engine.add_request("c", [5, 6], greedy(2))
    engine.step()  # a and b start running: the queue has room again
    engine.add_request("c", [5, 6], greedy(2))
    engine.add_request("d", [5, 6], greedy(2))
    with pytest.raises(QueueFull):
        engine.add_request("e", [5, 6], greedy(2))
    for rid in "abcd":
        engine.abort_request(rid)
    assert not engine.has_unfinished_requests()


def test_abort_frees_blocks(model_dir):
    engine = make_engine(model_dir)
    for i, prompt in enumerate(random_prompts((30, 20, 40), seed=5)):
        engine.add_request(str(i), prompt, greedy(50))
    for _ in range(3):
        engine.step()
    used = engine.stats.kv_blocks_used
    engine.abort_request("2")  # 40 + 2 tokens: 3 blocks
    assert engine.stats.kv_blocks_used == used - 3 and engine.stats.num_running == 2
    engine.abort_request("2")  # unknown ids are ignored
    engine.abort_request("0")
    engine.abort_request("1")
    assert engine.stats.kv_blocks_used == 0 and not engine.has_unfinished_requests()
    assert engine.step() == []


def test_invalid_requests_are_refused(model_dir):
    engine = make_engine(model_dir, max_model_len=32)
    with pytest.raises(InvalidParameter) as info:
        engine.add_request("a", [5] * 20, greedy(13))
    assert info.value.param == "max_tokens"
    engine.add_request("ok", [5] * 20, greedy(12))  # exactly the context
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", [5], greedy(1))
    with pytest.raises(InvalidParameter, match="no tokens"):
        engine.add_request("b", [], greedy(1))
    with pytest.raises(InvalidParameter, match="token ids must be in"):
        engine.add_request("b", [5, 50], greedy(1))
    with pytest.raises(InvalidParameter) as info:
        engine.add_request("b", [5] * 32, greedy(1))
    assert info.value.param == "prompt"
    with pytest.raises(UnknownAdapter):
        engine.add_request("b", [5], greedy(1), lora_id="nope")
    results = {out.request_id: out for out in _drain(engine)}
    assert results["ok"].finish_reason == "length" and results["ok"].completion_tokens == 12


def _drain(engine):
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs
