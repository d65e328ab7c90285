"""Many adapters in one packed step against PEFT's single-adapter forward and generate."""

from __future__ import annotations

import asyncio

import pytest
from peft import PeftModel

from peftserve.engine.engine import AsyncLLMEngine, UnknownAdapter
from peftserve.lora.peft_adapter import load_adapter
from tests.engine_helpers import (
    greedy,
    hf_greedy,
    hf_last_logits,
    load_hf,
    make_engine,
    random_prompts,
    rel_err,
    run_to_completion,
)
from tests.tiny_models import FAMILIES, make_peft_adapter, make_tiny_model

ADAPTERS = {
    "r1": dict(r=1, target_modules=["q_proj"], lora_alpha=2),
    "r64": dict(r=64, target_modules="all-linear", lora_alpha=16, use_rslora=True),
    "r8": dict(r=8, target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"], lora_alpha=8,
               rank_pattern={"down_proj": 4}),
    "r3": dict(r=3, target_modules=["v_proj", "up_proj"], lora_alpha=5, layers_to_transform=[1]),
}  # fmt: skip
REQUESTS = [None, "r1", "r64", "r8", None, "r3", "r64", "r1", "r8", "r3", None, "r64"]
LENGTHS = (6, 11, 3, 17, 25, 9, 1, 30, 14, 22, 5, 19)


def _setup(root, family):
    model_dir = make_tiny_model(root, family)
    adapters = {
        name: make_peft_adapter(model_dir, root / f"{family}-{name}", seed=i + 1, **spec)
        for i, (name, spec) in enumerate(ADAPTERS.items())
    }
    return model_dir, adapters


def _engine_with_adapters(model_dir, adapters, backend="torch"):
    engine = make_engine(model_dir, max_loras=4, max_lora_rank=64, lora_backend=backend)
    for name, path in adapters.items():
        engine.add_lora(name, load_adapter(path, engine.model, 64))
    return engine


# The Triton backend runs on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py).
CASES = [(family, "torch") for family in FAMILIES] + [("llama", "triton")]


@pytest.mark.parametrize("family, backend", CASES)
def test_mixed_adapter_step_matches_peft(tmp_path, family, backend):
    model_dir, adapters = _setup(tmp_path, family)
    engine = _engine_with_adapters(model_dir, adapters, backend)
    assert engine.lora_manager.backend.name == backend
    new_tokens = 16 if backend == "torch" else 3  # the interpreter runs each kernel in numpy
    prompts = random_prompts(LENGTHS, seed=13)
    for i, (prompt, name) in enumerate(zip(prompts, REQUESTS, strict=True)):
        engine.add_request(str(i), prompt, greedy(new_tokens), lora_id=name)
    first, logits = engine.step_with_logits()
    assert len(logits) == len(prompts)
    assert engine.stats.max_loras_in_step == 4 and engine.stats.mixed_lora_steps == 1
    results = run_to_completion(engine)
    for out in first:
        results[out.request_id].token_ids[:0] = out.token_ids
    base = load_hf(model_dir)
    for name in [None, *ADAPTERS]:
        model = PeftModel.from_pretrained(load_hf(model_dir), adapters[name]).eval() if name else base
        for i in (i for i, n in enumerate(REQUESTS) if n == name):
            want = hf_last_logits(model, prompts[i])
            assert rel_err(logits[str(i)], want) < 1e-4, (family, name, i)
            if name is not None:  # the adapter matters: the test would fail without it
                assert rel_err(hf_last_logits(base, prompts[i]), want) > 1e-3
            assert results[str(i)].token_ids == hf_greedy(model, prompts[i], new_tokens), (family, name, i)


def test_remove_lora_drains_running_requests(tmp_path):
    model_dir, adapters = _setup(tmp_path, "llama")
    engine = _engine_with_adapters(model_dir, adapters)
    engine.add_request("a", [5, 6, 7], greedy(8), lora_id="r8")
    first = engine.step()
    engine.remove_lora("r8")
    with pytest.raises(UnknownAdapter):
        engine.add_request("b", [5, 6, 7], greedy(8), lora_id="r8")
    with pytest.raises(ValueError, match="in use"):
        engine.add_lora("r8", load_adapter(adapters["r8"], engine.model, 64))
    assert engine.lora_manager.is_loaded("r8")  # "a" still runs on it
    results = run_to_completion(engine)
    assert len(first[0].token_ids + results["a"].token_ids) == 8
    assert results["a"].last.finish_reason == "length"
    assert not engine.lora_manager.is_loaded("r8") and engine.lora_manager.num_free_slots == 1
    with pytest.raises(UnknownAdapter):
        engine.remove_lora("r8")


def test_async_add_and_remove_lora(tmp_path):
    model_dir, adapters = _setup(tmp_path, "llama")
    engine = AsyncLLMEngine(make_engine(model_dir, max_loras=2))
    adapter = load_adapter(adapters["r3"], engine.engine.model, 64)
    engine.start()

    async def main():
        slot = await engine.add_lora("r3", adapter)
        outs = [o async for o in engine.generate("x", [5, 6, 7, 8], greedy(4), lora_id="r3")]
        await engine.remove_lora("r3")
        return slot, outs

    try:
        slot, outs = asyncio.run(main())
    finally:
        engine.shutdown()
    assert slot == 1 and outs[-1].finish_reason == "length"
    assert not engine.engine.lora_manager.is_loaded("r3")
