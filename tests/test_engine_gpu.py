"""The engine on CUDA (fp32 and bf16) against Hugging Face and PEFT on the same device."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftserve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.sampling_params import SamplingParams
from peftserve.lora.peft_adapter import load_adapter
from tests.engine_helpers import PROMPT_LENGTHS, generate_all, greedy, random_prompts
from tests.tiny_models import FAMILIES, make_peft_adapter, make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def _engine(
    model_dir, dtype: str, num_blocks: int = 0, backend: str = "auto", cuda_graphs: bool = True
) -> LLMEngine:
    kv_gb = num_blocks * 2 * 2 * 2 * 16 * 16 * _DTYPES[dtype].itemsize / 2**30 if num_blocks else 0.0
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model=str(model_dir), device="cuda", dtype=dtype, cuda_graphs=cuda_graphs),
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


def _graph_run(engine: LLMEngine, adapters: dict, seed: int) -> tuple[dict, dict]:
    """Mixed adapters, greedy and seeded sampling, batch sizes off the buckets; tokens and
    the logits of every sampled step."""
    for name, path in adapters.items():
        engine.add_lora(name, load_adapter(path, engine.model, 64))
    names = [None, "a", "b", "a", None, "b", "a", "b", None, "a", "b"]
    prompts = random_prompts((3, 17, 5, 30, 9, 1, 12, 26, 7, 20, 11), seed=seed)
    lengths = (6, 14, 3, 9, 11, 2, 7, 12, 5, 16, 8)
    for i, (prompt, name, n) in enumerate(zip(prompts, names, lengths, strict=True)):
        params = greedy(n) if i % 3 else SamplingParams(max_tokens=n, temperature=0.8, seed=i, ignore_eos=True)
        engine.add_request(str(i), prompt, params, lora_id=name)
    tokens: dict = {}
    logits: dict = {}
    while engine.has_unfinished_requests():
        outs, step_logits = engine.step_with_logits()
        for out in outs:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        for rid, row in step_logits.items():
            logits.setdefault(rid, []).append(row)
    return tokens, logits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_cuda_graph_replay_matches_eager(tmp_path, family, dtype):
    kwargs = {"sliding_window": 8} if family == "mistral" else {}
    model_dir = make_tiny_model(tmp_path, family, **kwargs)
    adapters = {
        "a": make_peft_adapter(model_dir, tmp_path / "a", r=8, target_modules="all-linear", seed=1),
        "b": make_peft_adapter(model_dir, tmp_path / "b", r=16, target_modules=["q_proj", "down_proj"], seed=2),
    }
    graphs = _engine(model_dir, dtype)
    assert graphs.runner.graphs is not None and graphs.runner.graphs.capture, "auto backends on CUDA capture"
    got, got_logits = _graph_run(graphs, adapters, seed=21)
    assert graphs.runner.graphs is not None and graphs.runner.graphs.num_captured >= 4
    twin = _engine(model_dir, dtype, cuda_graphs=False)
    twin.runner.use_decode_graphs(capture=False)  # the same padded steps, eager
    want, want_logits = _graph_run(twin, adapters, seed=21)
    assert got == want
    for rid, rows in want_logits.items():
        for g, w in zip(got_logits[rid], rows, strict=True):
            assert _rel(g.float(), w.float()) < (1e-5 if dtype == "float32" else 2e-3), (rid, family, dtype)
    if dtype == "float32":  # and the same as the plain, unpadded eager engine
        plain, _ = _graph_run(_engine(model_dir, dtype, cuda_graphs=False), adapters, seed=21)
        assert got == plain
