"""The engine on CUDA (fp32 and bf16) against Hugging Face and PEFT on the same device."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftserve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from peftserve.engine.engine import LLMEngine
from peftserve.lora.peft_adapter import load_adapter
from tests.engine_helpers import PROMPT_LENGTHS, generate_all, greedy, random_prompts
from tests.tiny_models import FAMILIES, make_peft_adapter, make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def _engine(model_dir, dtype: str, num_blocks: int = 0, backend: str = "auto") -> LLMEngine:
    kv_gb = num_blocks * 2 * 2 * 2 * 16 * 16 * _DTYPES[dtype].itemsize / 2**30 if num_blocks else 0.0
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model=str(model_dir), device="cuda", dtype=dtype),
            lora=LoRAConfig(max_loras=4, max_lora_rank=64, lora_backend=backend),
            cache=CacheConfig(kv_cache_memory_gb=kv_gb, max_model_len=128 if num_blocks else 0),
            scheduler=SchedulerConfig(max_num_seqs=32),
        )
    )


def _hf(model_dir, dtype: str, adapter=None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_DTYPES[dtype]).cuda().eval()
    return PeftModel.from_pretrained(model, adapter).eval() if adapter else model


def _hf_logits(model, prompt) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt], device="cuda")).logits[0, -1].float()


def _hf_greedy(model, prompt, n=16) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
            do_sample=False, eos_token_id=None,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_step_and_generation_match_hf(tmp_path, family, dtype):
    model_dir = make_tiny_model(tmp_path, family)
    engine = _engine(model_dir, dtype)
    assert engine.device.type == "cuda" and engine.dtype == _DTYPES[dtype]
    prompts = random_prompts(PROMPT_LENGTHS, seed=1)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, greedy(16))
    first, logits = engine.step_with_logits()
    results = generate_all(engine, [], greedy())  # runs the queued requests dry
    first_ids = {out.request_id: out.token_ids for out in first}
    ref = _hf(model_dir, dtype)
    for i, prompt in enumerate(prompts):
        assert _rel(logits[str(i)].float(), _hf_logits(ref, prompt)) < _TOLERANCE[dtype], (family, i)
        if dtype == "float32":
            tokens = first_ids[str(i)] + results[str(i)].token_ids
            assert tokens == _hf_greedy(ref, prompt), (family, i)


def test_cuda_preemption_and_sampling_complete(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    prompts = random_prompts((5, 40, 17, 30, 9, 26, 33, 12, 21, 38), seed=4)
    want = generate_all(_engine(model_dir, "float32"), prompts, greedy(24))
    engine = _engine(model_dir, "float32", num_blocks=8)
    got = generate_all(engine, prompts, greedy(24))
    assert engine.stats.num_preemptions > 0
    assert {k: r.token_ids for k, r in got.items()} == {k: r.token_ids for k, r in want.items()}


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cuda_mixed_adapters_match_peft(tmp_path, backend):
    model_dir = make_tiny_model(tmp_path, "llama")
    specs = {
        "r1": dict(r=1, target_modules=["q_proj"]),
        "r64": dict(r=64, target_modules="all-linear"),
        "r8": dict(r=8, target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"]),
    }
    adapters = {n: make_peft_adapter(model_dir, tmp_path / n, seed=i + 1, **s) for i, (n, s) in enumerate(specs.items())}
    engine = _engine(model_dir, "float32", backend=backend)
    for name, path in adapters.items():
        engine.add_lora(name, load_adapter(path, engine.model, 64))
    names = [None, "r1", "r64", "r8", "r64", None, "r8", "r1", "r64"]
    prompts = random_prompts((6, 11, 3, 17, 25, 9, 1, 30, 14), seed=13)
    for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
        engine.add_request(str(i), prompt, greedy(16), lora_id=name)
    _, logits = engine.step_with_logits()
    assert engine.stats.max_loras_in_step == 3
    for name in [None, *specs]:
        ref = _hf(model_dir, "float32", adapters[name] if name else None)
        for i in (i for i, n in enumerate(names) if n == name):
            assert _rel(logits[str(i)].float(), _hf_logits(ref, prompts[i])) < 1e-4, (backend, name, i)
