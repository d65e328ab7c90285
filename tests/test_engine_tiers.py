"""Adapter memory tiers: GPU slots <- CPU cache <- disk, and the scheduling around them."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from functools import partial

import pytest

from peftserve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from peftserve.engine.engine import AsyncLLMEngine, LLMEngine, SlotsBusy, UnknownAdapter
from peftserve.engine.scheduler import MAX_SLOT_WAIT_STEPS
from peftserve.engine.sequence import SequenceStatus
from peftserve.lora.cache import AdapterCache
from peftserve.lora.peft_adapter import AdapterError, load_adapter
from tests.engine_helpers import BLOCK_BYTES, collect, greedy, random_prompts, run_to_completion
from tests.tiny_models import make_peft_adapter, make_tiny_model

SPECS = [
    dict(r=2, target_modules=["q_proj", "v_proj"]),
    dict(r=4, target_modules=["k_proj", "o_proj"]),
    dict(r=8, target_modules="all-linear"),
    dict(r=4, target_modules=["gate_proj", "down_proj"]),
    dict(r=2, target_modules=["up_proj", "q_proj"]),
    dict(r=8, target_modules=["v_proj", "o_proj"]),
]
NAMES = [f"t{i}" for i in range(len(SPECS))]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiers")
    model_dir = make_tiny_model(root, "llama")
    paths = {
        name: make_peft_adapter(model_dir, root / name, seed=i + 1, lora_alpha=8, std=0.2, **spec)
        for i, (name, spec) in enumerate(zip(NAMES, SPECS, strict=True))
    }
    return model_dir, paths


def _engine(model_dir, max_loras: int, max_cpu_adapters: int = 64, num_blocks: int | None = None) -> LLMEngine:
    kv_gb = num_blocks * BLOCK_BYTES / 2**30 if num_blocks else 0.0
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model=str(model_dir), device="cpu", dtype="float32"),
            lora=LoRAConfig(max_loras=max_loras, max_cpu_adapters=max_cpu_adapters, max_lora_rank=8),
            cache=CacheConfig(kv_cache_memory_gb=kv_gb, max_model_len=64 if num_blocks else 0),
            scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256),
        )
    )


class CountingLoader:
    """A disk loader (``load_adapter``) that counts its calls and can be slowed down."""

    def __init__(self, path, engine: LLMEngine, delay: float = 0.0) -> None:
        self.path, self.engine, self.delay = path, engine, delay
        self.calls = 0
        self.started = threading.Event()
        self.window: tuple[float, float] | None = None

    def __call__(self):
        self.calls += 1
        start = time.monotonic()
        self.started.set()
        time.sleep(self.delay)
        adapter = load_adapter(self.path, self.engine.model, 8)
        self.window = (start, time.monotonic())
        return adapter


def _register_all(engine: LLMEngine, paths, **kwargs) -> dict[str, CountingLoader]:
    loaders = {name: CountingLoader(path, engine, **kwargs) for name, path in paths.items()}
    for name, loader in loaders.items():
        engine.register_lora(name, loader)
    return loaders


def _zipf_workload(n: int = 24, seed: int = 0):
    """``n`` greedy requests; adapter k drawn with weight 1/(k+1), a few on the base model."""
    rng = random.Random(seed)
    choices = [None, *NAMES]
    weights = [0.3] + [1 / (k + 1) for k in range(len(NAMES))]
    lora_ids = rng.choices(choices, weights, k=n)
    prompts = random_prompts([rng.randint(2, 30) for _ in range(n)], seed=seed)
    return prompts, lora_ids


def _submit(engine: LLMEngine, prompts, lora_ids, max_tokens: int = 8) -> None:
    for i, (prompt, lora_id) in enumerate(zip(prompts, lora_ids, strict=True)):
        engine.add_request(str(i), prompt, greedy(max_tokens), lora_id)


def _run_one(engine: LLMEngine, rid: str, lora_id: str | None, prompt=(5, 6, 7), max_tokens: int = 4):
    engine.add_request(rid, list(prompt), greedy(max_tokens), lora_id)
    return run_to_completion(engine)[rid]


def _spy_steps(engine: LLMEngine) -> list[dict[str, int]]:
    """Record, per step, each scheduled adapter's slot, checked against the slot table."""
    steps: list[dict[str, int]] = []
    schedule = engine.scheduler.schedule

    def spy():
        out = schedule()
        slots = {seq.lora_id: seq.slot for seq in out.seqs if seq.lora_id is not None}
        for lora_id, slot in slots.items():
            assert engine.lora_manager.slot_of(lora_id) == slot, (lora_id, slot)
        assert len(set(slots.values())) == len(slots)
        steps.append(slots)
        return out

    engine.scheduler.schedule = spy
    return steps


@pytest.fixture(scope="module")
def reference(assets):
    """The zipf workload on an engine with a slot for every adapter."""
    model_dir, paths = assets
    engine = _engine(model_dir, max_loras=len(NAMES))
    for name, path in paths.items():
        engine.add_lora(name, load_adapter(path, engine.model, 8))
    _submit(engine, *_zipf_workload())
    results = run_to_completion(engine)
    assert engine.stats.max_loras_in_step > 2  # the constrained runs below must hold back
    return {rid: r.token_ids for rid, r in results.items()}


# ---- the CPU tier alone ----------------------------------------------------------------------


def test_adapter_cache_is_lru():
    cache = AdapterCache(2)
    assert cache.put("a", "A") == [] and cache.put("b", "B") == []
    assert cache.put("a", "A") == []  # refresh: b is now the least recent
    assert cache.put("c", "C") == ["b"] and cache.ids() == ["a", "c"]
    assert cache.pop("a") == "A" and "a" not in cache and len(cache) == 1
    with pytest.raises(ValueError, match="at least one"):
        AdapterCache(0)
    with pytest.raises(ValueError, match="max_cpu_adapters"):
        LoRAConfig(max_cpu_adapters=0)


# ---- scheduling over more adapters than slots ---------------------------------------------


@pytest.mark.parametrize("num_blocks", [None, 12], ids=["roomy-kv", "preempting"])
def test_zipf_over_three_times_more_adapters_than_slots(assets, reference, num_blocks):
    model_dir, paths = assets
    engine = _engine(model_dir, max_loras=2, max_cpu_adapters=3, num_blocks=num_blocks)
    loaders = _register_all(engine, paths)
    assert set(engine.lora_status().values()) == {"disk"}
    steps = _spy_steps(engine)
    _submit(engine, *_zipf_workload())
    results = run_to_completion(engine)
    assert {rid: r.token_ids for rid, r in results.items()} == reference
    assert all(r.last.finish_reason == "length" for r in results.values())
    stats = engine.stats
    assert stats.max_loras_in_step == 2 and max(len(s) for s in steps) == 2
    assert stats.gpu_slots_total == 2 and stats.gpu_slots_used == 2
    assert stats.adapter_evictions > 0 and stats.cpu_cache_hits + stats.cpu_cache_misses == stats.adapter_loads
    assert stats.cpu_cache_misses == sum(loader.calls for loader in loaders.values())
    assert stats.adapter_load_seconds_total > 0
    if num_blocks:
        assert stats.num_preemptions > 0


def test_no_head_of_line_blocking_and_no_starvation(assets):
    """One slot, adapter a always busy: b's request waits, later a requests pass it, then
    after MAX_SLOT_WAIT_STEPS nobody passes it any more and it gets the slot."""
    model_dir, paths = assets
    engine = _engine(model_dir, max_loras=1)
    engine.register_lora("a", CountingLoader(paths["t0"], engine))
    engine.register_lora("b", CountingLoader(paths["t1"], engine))
    engine.add_request("a0", [5, 6], greedy(6), "a")
    engine.step()
    engine.add_request("b0", [5, 6], greedy(4), "b")
    b0 = engine.scheduler.get("b0")
    results: dict = {}
    admitted_at = None
    for i in range(MAX_SLOT_WAIT_STEPS + 40):
        engine.add_request(f"a{i + 1}", [7, 8], greedy(6), "a")  # a never runs out of work
        collect(results, engine.step())
        if i == 0:  # a1 passed b0, which waits for the slot
            assert engine.scheduler.get("a1").status is SequenceStatus.RUNNING
        if admitted_at is None and b0.status is not SequenceStatus.WAITING:
            admitted_at = i
    assert admitted_at is not None and MAX_SLOT_WAIT_STEPS <= admitted_at <= MAX_SLOT_WAIT_STEPS + 10
    while engine.has_unfinished_requests():
        collect(results, engine.step())
    assert results["b0"].last.finish_reason == "length" and len(results["b0"].token_ids) == 4
    assert engine.stats.max_loras_in_step == 1


# ---- eviction order, counters, explicit load and unload -----------------------------------


def test_lru_eviction_and_cache_counters(assets):
    model_dir, paths = assets
    engine = _engine(model_dir, max_loras=2, max_cpu_adapters=2)
    loaders = _register_all(engine, {n: paths[p] for n, p in zip("abcde", NAMES, strict=False)})
    loads: list[tuple[str, str]] = []
    engine.on_adapter_load = lambda lora_id, seconds, source: loads.append((lora_id, source))
    for name in "abc":  # c evicts a, the least recently used
        _run_one(engine, name, name)
    assert engine.lora_status() == {"a": "cpu", "b": "gpu", "c": "gpu", "d": "disk", "e": "disk"}
    _run_one(engine, "a2", "a")  # a hit; evicts b (used before c)
    assert engine.lora_status() == {"a": "gpu", "b": "cpu", "c": "gpu", "d": "disk", "e": "disk"}
    stats = engine.stats
    assert (stats.cpu_cache_hits, stats.cpu_cache_misses, stats.adapter_loads, stats.adapter_evictions) == (1, 3, 4, 2)
    _run_one(engine, "d", "d")  # disk; evicts c: the CPU cache holds b, c
    _run_one(engine, "e", "e")  # disk: pushes b (least recent) out of the CPU cache; evicts a
    assert engine.lora_status() == {"a": "cpu", "b": "disk", "c": "cpu", "d": "gpu", "e": "gpu"}
    assert engine.stats.cpu_cache_used == engine.stats.cpu_cache_total == 2
    _run_one(engine, "b2", "b")  # b is read from disk again
    assert loaders["b"].calls == 2 and loaders["a"].calls == 1
    assert loads == [("a", "disk"), ("b", "disk"), ("c", "disk"), ("a", "cpu"), ("d", "disk"),
                     ("e", "disk"), ("b", "disk")]  # fmt: skip
    stats = engine.stats
    assert (stats.cpu_cache_hits, stats.cpu_cache_misses, stats.adapter_loads) == (1, 6, 7)


def test_load_lora_evicts_an_idle_adapter_and_refuses_when_all_are_busy(assets):
    model_dir, paths = assets
    engine = _engine(model_dir, max_loras=2)
    _register_all(engine, {n: paths[p] for n, p in zip("abcd", NAMES, strict=False)})
    assert engine.load_lora("a") == engine.lora_manager.slot_of("a")
    engine.load_lora("b")
    engine.add_request("ra", [5, 6, 7], greedy(20), "a")
    engine.step()
    engine.load_lora("c")  # b is idle: it goes, a (running) stays
    assert engine.lora_status() == {"a": "gpu", "b": "cpu", "c": "gpu", "d": "disk"}
    engine.add_request("rc", [5, 6, 7], greedy(20), "c")
    engine.step()
    with pytest.raises(SlotsBusy):
        engine.load_lora("d")
    assert engine.lora_status()["d"] == "disk"
    with pytest.raises(UnknownAdapter):
        engine.load_lora("nope")
    run_to_completion(engine)
    engine.load_lora("d")  # evicts a, the least recently used
    assert engine.lora_status() == {"a": "cpu", "b": "cpu", "c": "gpu", "d": "gpu"}


def test_unload_is_deferred_while_in_use(assets):
    model_dir, paths = assets
    engine = _engine(model_dir, max_loras=2)
    _register_all(engine, {"a": paths["t2"], "b": paths["t3"]})
    alone = _run_one(engine, "ref", "a", max_tokens=6).token_ids
    assert engine.unload_lora("a") is True and engine.lora_status()["a"] == "cpu"
    assert engine.unload_lora("b") is True  # not resident: nothing to do
    engine.add_request("a1", [5, 6, 7], greedy(6), "a")
    results: dict = {}
    collect(results, engine.step())
    assert engine.unload_lora("a") is False and engine.lora_status()["a"] == "gpu"
    engine.add_request("a2", [5, 6, 7], greedy(6), "a")
    collect(results, engine.step())
    assert engine.scheduler.get("a2").status is SequenceStatus.WAITING  # held back
    evictions = engine.stats.adapter_evictions
    while engine.has_unfinished_requests():
        collect(results, engine.step())
    assert engine.stats.adapter_evictions == evictions + 1  # unloaded when a1 ended, loaded back for a2
    assert results["a1"].token_ids == results["a2"].token_ids == alone
    with pytest.raises(UnknownAdapter):
        engine.unload_lora("nope")


def test_unregister_drains_then_drops_from_every_tier(assets):
    model_dir, paths = assets
    engine = _engine(model_dir, max_loras=1)
    _register_all(engine, {"a": paths["t0"], "b": paths["t1"]})
    engine.add_request("r1", [5, 6], greedy(4), "a")
    engine.add_request("r2", [5, 6], greedy(4), "b")  # waits for a's slot
    engine.step()
    engine.unregister_lora("b")  # its queued request still runs
    engine.unregister_lora("a")
    with pytest.raises(UnknownAdapter):
        engine.add_request("r3", [5, 6], greedy(4), "a")
    with pytest.raises(ValueError, match="in use"):
        engine.register_lora("a", lambda: None)
    assert engine.lora_status() == {}
    results = run_to_completion(engine)
    assert {r.last.finish_reason for r in results.values()} == {"length"}
    assert engine.lora_manager.num_free_slots == 1 and len(engine.tiers.cpu) == 0
    engine.register_lora("a", CountingLoader(paths["t0"], engine))  # the name is free again
    assert engine.lora_status() == {"a": "disk"}


def test_a_failed_disk_load_fails_only_its_requests(assets):
    model_dir, paths = assets
    engine = _engine(model_dir, max_loras=1)

    def broken():
        raise AdapterError("adapter_model.safetensors is corrupt")

    engine.register_lora("bad", broken)
    engine.register_lora("good", CountingLoader(paths["t0"], engine))
    engine.add_request("x", [5, 6], greedy(4), "bad")
    engine.add_request("y", [5, 6], greedy(4), "good")
    results = run_to_completion(engine)
    assert results["x"].last.finish_reason == "error" and "corrupt" in results["x"].last.error
    assert results["y"].last.finish_reason == "length"
    assert engine.lora_status() == {"bad": "disk", "good": "gpu"}
    with pytest.raises(AdapterError, match="corrupt"):
        engine.load_lora("bad")


def test_add_lora_with_full_slots_waits_in_the_cpu_tier(assets):
    model_dir, paths = assets
    engine = _engine(model_dir, max_loras=1)
    assert engine.add_lora("a", load_adapter(paths["t0"], engine.model, 8)) == 1
    assert engine.add_lora("b", load_adapter(paths["t1"], engine.model, 8)) == 0
    assert engine.lora_status() == {"a": "gpu", "b": "cpu"}
    assert _run_one(engine, "r", "b").last.finish_reason == "length"
    assert engine.lora_status() == {"a": "cpu", "b": "gpu"} and engine.stats.cpu_cache_hits == 1


# ---- the async engine: registration at run time and background disk loads ------------------


async def _stream(engine: AsyncLLMEngine, rid: str, prompt, params, lora_id=None):
    """(token ids, arrival time of each output with tokens)."""
    ids, times = [], []
    async for out in engine.generate(rid, prompt, params, lora_id=lora_id):
        ids += out.token_ids
        times += [time.monotonic()] * len(out.token_ids)
    return ids, times


def test_register_while_running_is_servable_at_once(assets):
    model_dir, paths = assets
    want = _run_one(_engine(model_dir, max_loras=1), "w", None, max_tokens=40).token_ids
    sync = _engine(model_dir, max_loras=1)
    sync.register_lora("new", CountingLoader(paths["t4"], sync))
    want_new = _run_one(sync, "w", "new", max_tokens=6).token_ids
    engine = AsyncLLMEngine(_engine(model_dir, max_loras=1))
    engine.start()

    async def main():
        base = asyncio.create_task(_stream(engine, "base", [5, 6, 7], greedy(40)))
        while not engine.stats.generated_tokens:
            await asyncio.sleep(0.005)
        await engine.register_lora("new", CountingLoader(paths["t4"], engine.engine))
        assert engine.lora_status() == {"new": "disk"}
        new = await _stream(engine, "new", [5, 6, 7], greedy(6), lora_id="new")
        return (await base)[0], new[0]

    try:
        base_ids, new_ids = asyncio.run(asyncio.wait_for(main(), 60))
        assert engine.lora_status() == {"new": "gpu"}
    finally:
        engine.shutdown()
    assert base_ids == want and new_ids == want_new


def test_a_slow_disk_load_does_not_stall_running_streams(assets):
    model_dir, paths = assets
    engine = AsyncLLMEngine(_engine(model_dir, max_loras=1))
    slow = CountingLoader(paths["t5"], engine.engine, delay=0.6)
    loads: list[tuple[str, float, str]] = []
    engine.on_adapter_load = lambda *args: loads.append(args)
    engine.start()

    async def main():
        await engine.register_lora("slow", slow)
        stream = asyncio.create_task(_stream(engine, "s", [5, 6, 7], greedy(200)))
        while not engine.stats.generated_tokens:
            await asyncio.sleep(0.005)
        adapter_ids, _ = await _stream(engine, "x", [5, 6, 7], greedy(4), lora_id="slow")
        return (await stream)[1], adapter_ids

    try:
        times, adapter_ids = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.shutdown()
    start, end = slow.window
    during = sum(start < t < end for t in times)
    assert during >= 5, f"only {during} tokens streamed during the {end - start:.2f}s disk load"
    assert len(adapter_ids) == 4 and slow.calls == 1
    assert loads and loads[0][0] == "slow" and loads[0][2] == "disk" and loads[0][1] >= 0.6
    assert engine.stats.cpu_cache_misses == 1


def test_async_load_and_unload_lora(assets):
    model_dir, paths = assets
    engine = AsyncLLMEngine(_engine(model_dir, max_loras=1))
    loader = CountingLoader(paths["t1"], engine.engine)
    engine.start()

    async def main():
        await engine.register_lora("a", loader)
        slot = await engine.load_lora("a")
        after_load = engine.lora_status()
        assert await engine.unload_lora("a") is True
        await engine.unregister_lora("a")
        with pytest.raises(UnknownAdapter):
            await engine.load_lora("a")
        return slot, after_load

    try:
        slot, after_load = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.shutdown()
    assert slot == 1 and after_load == {"a": "gpu"} and loader.calls == 1
    assert engine.lora_status() == {} and engine.stats.adapter_evictions == 1


def test_the_step_never_exceeds_slots_in_the_async_engine(assets, reference):
    model_dir, paths = assets
    engine = AsyncLLMEngine(_engine(model_dir, max_loras=2, max_cpu_adapters=2))
    loaders = {name: CountingLoader(path, engine.engine, delay=0.02) for name, path in paths.items()}
    prompts, lora_ids = _zipf_workload()
    engine.start()

    async def main():
        for name, loader in loaders.items():
            await engine.register_lora(name, loader)
        streams = [
            _stream(engine, str(i), prompt, greedy(8), lora_id)
            for i, (prompt, lora_id) in enumerate(zip(prompts, lora_ids, strict=True))
        ]
        return await asyncio.gather(*streams)

    try:
        got = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.shutdown()
    assert {str(i): ids for i, (ids, _) in enumerate(got)} == reference
    assert 1 <= engine.stats.max_loras_in_step <= 2 and engine.stats.kv_blocks_used == 0


def test_partial_is_a_fine_loader(assets):
    """The admin API registers ``partial(load_adapter, path, model, rank)``."""
    model_dir, paths = assets
    engine = _engine(model_dir, max_loras=1)
    engine.register_lora("p", partial(load_adapter, paths["t0"], engine.model, 8, name="p"))
    assert _run_one(engine, "r", "p").last.finish_reason == "length"


def test_a_failed_background_load_ends_its_stream_with_an_error(assets):
    model_dir, _ = assets
    engine = AsyncLLMEngine(_engine(model_dir, max_loras=1))
    engine.start()

    def broken():
        raise OSError("disk unplugged")

    async def main():
        await engine.register_lora("bad", broken)
        outs = [out async for out in engine.generate("x", [5, 6], greedy(4), lora_id="bad")]
        base = [out async for out in engine.generate("y", [5, 6], greedy(4))]
        return outs, base

    try:
        outs, base = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.shutdown()
    assert len(outs) == 1 and outs[0].finish_reason == "error" and "disk unplugged" in outs[0].error
    assert base[-1].finish_reason == "length"
