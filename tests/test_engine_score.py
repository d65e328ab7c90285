"""Teacher-forced scoring (SamplingParams.score_from) against PEFT's own forward."""

from __future__ import annotations

import asyncio

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftserve.engine.engine import AsyncLLMEngine
from peftserve.lora.peft_adapter import load_adapter
from tests.engine_helpers import greedy, make_engine, random_prompts
from tests.tiny_models import make_peft_adapter, make_tiny_model


def _reference(model, prompt: list[int], target: list[int]) -> list[float]:
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # [L, V]
    return [logp[len(prompt) + i - 1, t].item() for i, t in enumerate(target)]


def test_score_matches_peft_forward_with_chunked_prefill(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    adapter_dir = make_peft_adapter(model_dir, tmp_path / "a", r=8, target_modules="all-linear")
    engine = make_engine(model_dir, max_num_batched_tokens=32, max_num_seqs=4)  # forces chunks
    engine.add_lora("a", load_adapter(adapter_dir, engine.model, 64))
    prompt, target = random_prompts((20, 37), seed=3)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    want_base = _reference(base, prompt, target)
    want_lora = _reference(PeftModel.from_pretrained(base, adapter_dir).eval(), prompt, target)
    got_base = engine.score(prompt, target)
    got_lora = engine.score(prompt, target, "a")
    assert len(got_base) == len(target) == len(got_lora)
    torch.testing.assert_close(torch.tensor(got_base), torch.tensor(want_base), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(got_lora), torch.tensor(want_lora), rtol=1e-4, atol=1e-4)
    assert max(abs(a - b) for a, b in zip(got_base, got_lora, strict=True)) > 1e-3


def test_async_score_alongside_generation(tmp_path):
    model_dir = make_tiny_model(tmp_path, "qwen2")
    engine = make_engine(model_dir)
    prompt, target, other = random_prompts((9, 12, 15), seed=5)
    want = engine.score(prompt, target)

    async def main() -> tuple[list[float], int]:
        aengine = AsyncLLMEngine(engine)
        aengine.start()
        try:
            async def gen() -> int:
                n = 0
                async for out in aengine.generate("g", other, greedy(24)):
                    n += len(out.token_ids)
                return n

            return await asyncio.gather(aengine.score(prompt, target), gen())
        finally:
            aengine.shutdown()

    got, generated = asyncio.run(main())
    assert generated == 24
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
