"""End-to-end generation throughput: peftserve with adapters vs without vs PEFT.

A program, not a test. Seeded synthetic workloads on a random-weight Llama-shaped
model; for each workload it prints generated tokens/s for

  (a) peftserve with the adapters,
  (b) peftserve with no adapters (the limit),
  (c) PEFT's own mixed-adapter batched ``generate(..., adapter_names=...)`` on the same
      requests in batches of 32,

and the ratios a/b and a/c, all measured in one run.

    python bench/throughput.py            # CPU: 27M-param model, uniform + mixed
    python bench/throughput.py --gpu      # CUDA: ~1B-param model, 32 distinct adapters
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from peftserve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.sampling_params import SamplingParams
from peftserve.lora.peft_adapter import load_adapter

logger = logging.getLogger("bench.throughput")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


CPU_SHAPE = Shape(hidden=512, intermediate=1376, layers=8, heads=8, kv_heads=8, vocab=2048)
GPU_SHAPE = Shape(hidden=2048, intermediate=5504, layers=16, heads=16, kv_heads=16, vocab=32000)


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int
    adapter: int  # index into the adapter list


def make_model(root: Path, shape: Shape, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight Llama-shaped model with a word-level tokenizer covering its vocab."""
    torch.manual_seed(seed)
    vocab = {f"t{i}": i for i in range(shape.vocab)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t3")
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    path = root / "base"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    logger.info("model: %.1fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return path


def make_adapters(root: Path, base: Path, n: int, rank: int, seed: int) -> list[Path]:
    """n rank-``rank`` adapters on all seven projections, random non-zero weights."""
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
    paths = []
    for i in range(n):
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        path = root / f"adapter{i}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def uniform_workload(rng: np.random.Generator, vocab: int) -> list[Req]:
    return [Req(rng.integers(4, vocab, 64).tolist(), 64, i % 8) for i in range(64)]


def mixed_workload(rng: np.random.Generator, vocab: int, n: int = 128, n_adapters: int = 32) -> list[Req]:
    ranks = np.arange(1, n_adapters + 1)
    popularity = ranks ** -1.2 / (ranks ** -1.2).sum()
    adapters = rng.choice(n_adapters, size=n, p=popularity)
    prompt_lens = rng.integers(16, 257, n)
    out_lens = rng.integers(8, 129, n)
    return [
        Req(rng.integers(4, vocab, int(p)).tolist(), int(o), int(a))
        for p, o, a in zip(prompt_lens, out_lens, adapters, strict=True)
    ]


def gpu_workload(rng: np.random.Generator, vocab: int) -> list[Req]:
    """256 requests over 32 distinct adapters (uniform), 128-token prompts, 128 new tokens."""
    return [Req(rng.integers(4, vocab, 128).tolist(), 128, i % 32) for i in range(256)]


def run_engine(engine: LLMEngine, reqs: list[Req], use_adapters: bool) -> tuple[float, int]:
    """Submit every request at once, step to completion; return (seconds, generated tokens)."""
    for i, r in enumerate(reqs):
        params = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(f"r{i}", r.prompt, params, lora_id=f"a{r.adapter}" if use_adapters else None)
    generated = 0
    _sync(engine.device)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += out.completion_tokens
    _sync(engine.device)
    return time.perf_counter() - start, generated


def run_peft(model: PeftModel, reqs: list[Req], batch: int, device: torch.device) -> tuple[float, int]:
    """PEFT's mixed-adapter batched generate on the same requests, in batches of ``batch``."""
    generated = 0
    _sync(device)
    start = time.perf_counter()
    for s in range(0, len(reqs), batch):
        chunk = reqs[s : s + batch]
        width = max(len(r.prompt) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, r in enumerate(chunk):  # left padding, as generate expects
            ids[j, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[j, width - len(r.prompt) :] = 1
        new = max(r.max_tokens for r in chunk)
        with torch.inference_mode():
            model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                adapter_names=[f"a{r.adapter}" for r in chunk],
                max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
            )  # fmt: skip
        generated += sum(r.max_tokens for r in chunk)  # only the tokens each request asked for
    _sync(device)
    return time.perf_counter() - start, generated


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_engine(base: Path, adapters: list[Path], device: str, dtype: str, max_seqs: int, rank: int) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(model=str(base), device=device, dtype=dtype),
        lora=LoRAConfig(max_lora_rank=rank, max_loras=len(adapters)),
        cache=CacheConfig(kv_cache_memory_gb=2.0 if device == "cpu" else 0.0),
        scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=4096),
    )
    engine = LLMEngine(config)
    for i, path in enumerate(adapters):
        engine.add_lora(f"a{i}", load_adapter(path, engine.model, rank, name=f"a{i}"))
    return engine


def build_peft(base: Path, adapters: list[Path], device: torch.device, dtype: torch.dtype) -> PeftModel:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(path, adapter_name=f"a{i}")
    return peft_model.eval()


def measure(
    name: str, engine: LLMEngine, peft_model: PeftModel, reqs: list[Req], device: torch.device, repeat: int,
    peft_limit: int | None = None,
) -> dict:
    """Interleave the three runs ``repeat`` times and keep each one's fastest (least disturbed)."""
    warm = reqs[:4]
    run_engine(engine, [Req(r.prompt, 4, r.adapter) for r in warm], True)  # warm-up
    runs: dict[str, list[tuple[float, int]]] = {"a": [], "b": [], "c": []}
    for _ in range(repeat):
        runs["a"].append(run_engine(engine, reqs, True))
        runs["b"].append(run_engine(engine, reqs, False))
        runs["c"].append(run_peft(peft_model, reqs[:peft_limit], 32, device))
    (t_a, n_a), (t_b, n_b), (t_c, n_c) = (min(runs[k]) for k in "abc")
    row = {
        "workload": name, "requests": len(reqs),
        "a_tok_s": n_a / t_a, "b_tok_s": n_b / t_b, "c_tok_s": n_c / t_c,
        "a_over_b": (n_a / t_a) / (n_b / t_b), "a_over_c": (n_a / t_a) / (n_c / t_c),
        "a_s": t_a, "b_s": t_b, "c_s": t_c, "tokens": n_a,
    }  # fmt: skip
    logger.info("%s done: %s", name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="~1B-param model on CUDA, 32 distinct adapters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workloads", default="uniform,mixed", help="comma list: uniform, mixed")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; the fastest of each counts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if args.gpu else "cpu")
    shape, dtype = (GPU_SHAPE, "bfloat16") if args.gpu else (CPU_SHAPE, "float32")
    n_adapters = 32
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_model(root, shape, args.seed, getattr(torch, dtype))
        adapters = make_adapters(root, base, n_adapters, 16, args.seed + 1)
        engine = build_engine(base, adapters, device.type, dtype, 256 if args.gpu else 128, 16)
        peft_model = build_peft(base, adapters, device, getattr(torch, dtype))
        if args.gpu:
            workloads = {"gpu32": gpu_workload(rng, shape.vocab)}
        else:
            all_w = {"uniform": uniform_workload(rng, shape.vocab), "mixed": mixed_workload(rng, shape.vocab)}
            workloads = {k: all_w[k] for k in args.workloads.split(",")}
        # On the GPU, PEFT's per-adapter loop makes it ~100x slower: it runs the first 64
        # requests (two batches of 32, all 32 adapters in each) and its rate is per token.
        peft_limit = 64 if args.gpu else None
        rows = [measure(name, engine, peft_model, reqs, device, args.repeat, peft_limit) for name, reqs in workloads.items()]
    print(f"\nmachine: {platform.node()} {platform.machine()} torch {torch.__version__} "
          f"threads {torch.get_num_threads()} device {torch.cuda.get_device_name() if args.gpu else 'cpu'}")
    print(f"{'workload':<10}{'(a) lora tok/s':>16}{'(b) base tok/s':>16}{'(c) peft tok/s':>16}{'a/b':>8}{'a/c':>8}")
    for r in rows:
        print(f"{r['workload']:<10}{r['a_tok_s']:>16.1f}{r['b_tok_s']:>16.1f}{r['c_tok_s']:>16.1f}"
              f"{r['a_over_b']:>8.2f}{r['a_over_c']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
