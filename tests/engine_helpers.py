"""Shared helpers for the engine tests: build an engine on a tiny model, run it, HF references."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from peftserve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.outputs import RequestOutput
from peftserve.engine.sampling_params import SamplingParams

PROMPT_LENGTHS = (1, 2, 3, 5, 8, 13, 17, 30, 31, 40)
BLOCK_BYTES = 2 * 2 * 2 * 16 * 16 * 4
"""KV bytes per 16-token block of the tiny models (2 layers, K+V, 2 kv heads, head_dim 16, fp32)."""


def make_engine(
    model_dir: Path,
    *,
    num_blocks: int | None = None,
    max_model_len: int = 0,
    block_size: int = 16,
    max_num_seqs: int = 32,
    max_num_batched_tokens: int = 2048,
    max_waiting: int = 1024,
    max_loras: int = 4,
    max_lora_rank: int = 64,
    lora_backend: str = "torch",
    attention_backend: str = "auto",
) -> LLMEngine:
    """An fp32 CPU engine; ``num_blocks`` sizes the KV budget in 16-token blocks."""
    kv_gb = num_blocks * BLOCK_BYTES / 2**30 if num_blocks else 0.0
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir), device="cpu", dtype="float32", attention_backend=attention_backend),
        lora=LoRAConfig(max_loras=max_loras, max_lora_rank=max_lora_rank, lora_backend=lora_backend),
        cache=CacheConfig(block_size=block_size, kv_cache_memory_gb=kv_gb, max_model_len=max_model_len),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_waiting=max_waiting
        ),
    )
    return LLMEngine(config)


def random_prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    """Prompts of ordinary character tokens (ids 4..49 of the tiny tokenizer)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 50, (n,), generator=gen).tolist() for n in lengths]


def greedy(max_tokens: int = 16, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    outputs: list[RequestOutput] = field(default_factory=list)

    @property
    def last(self) -> RequestOutput:
        return self.outputs[-1]


def collect(results: dict[str, Result], outputs: list[RequestOutput]) -> None:
    for out in outputs:
        res = results.setdefault(out.request_id, Result())
        assert not (res.outputs and res.last.finished), f"{out.request_id} got output after finishing"
        res.token_ids += out.token_ids
        res.text += out.text
        res.outputs.append(out)


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, Result]:
    results: dict[str, Result] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        collect(results, engine.step())
    assert not engine.has_unfinished_requests()
    assert engine.stats.kv_blocks_used == 0
    return results


def generate_all(engine: LLMEngine, prompts: list[list[int]], params, lora_ids=None) -> dict[str, Result]:
    """Add every prompt (request ids "0", "1", ...) and run the engine dry."""
    for i, prompt in enumerate(prompts):
        p = params[i] if isinstance(params, list) else params
        engine.add_request(str(i), prompt, p, lora_ids[i] if lora_ids else None)
    return run_to_completion(engine)


def load_hf(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int = 16) -> list[int]:
    """HF/PEFT ``generate(do_sample=False)`` with EOS off (the engine runs with ignore_eos)."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
        )
    return out[0, len(prompt) :].tolist()


def hf_last_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt])).logits[0, -1].float()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()
