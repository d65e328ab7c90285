"""End-to-end generation throughput: peftserve with adapters vs without vs PEFT (vs transformers).

A program, not a test. Seeded synthetic workloads on a random-weight Llama-shaped model,
every figure a ratio to a peer measured in the same run.

CPU (the default): for each workload, generated tokens/s of

  (a) peftserve with the adapters,
  (b) peftserve with no adapters (the limit),
  (c) PEFT's own mixed-adapter batched ``generate(..., adapter_names=...)`` on the same
      requests in batches of 32,

and the ratios a/b and a/c. The engine runs its synchronous ``step()`` (detokenization
included, as the recorded figures were taken).

GPU (``--gpu``; ``--cpu-smoke`` runs the same code paths on the CPU with a tiny model, in
seconds): a decode-heavy workload on a 1B-class Llama (940M parameters, bf16), 256 requests
of 128 prompt + 128 new tokens over 32 distinct rank-16 adapters on all seven projections:

  (a), (b), (c) as above (PEFT on the first 32 requests, its rate per token), and
  (d) transformers' own continuous batching (``generate_batch``: paged attention, CUDA
      graphs, no adapters) on the same model and requests;

then batch-1 decode with one adapter (achieved weight bandwidth, weight bytes read per
token x tokens/s, over the device's copy bandwidth measured in the same run), and the host
time per decode step at batch 64 with 32 adapters (wall time of the engine thread's step
minus the time it waits for the device; CUDA graphs on). Here the engine runs its token
loop (``step_tokens``): what its thread does in a server, where detokenization runs on
another thread.

    python bench/throughput.py --repeat 2         # CPU: 27M-param model, uniform + mixed
    python bench/throughput.py --gpu              # CUDA: the figures above
    python bench/throughput.py --gpu --quick      # CUDA: fewer requests and tokens (a first look)
    python bench/throughput.py --cpu-smoke        # the --gpu code paths on the CPU, tiny model
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

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
SMOKE_SHAPE = Shape(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int
    adapter: int  # index into the adapter list


@dataclass
class GpuSizes:
    """Sizes of the --gpu figures (full, --quick, --cpu-smoke)."""

    requests: int
    prompt: int
    new_tokens: int
    peft_requests: int
    batch1_tokens: int
    host_batch: int
    host_tokens: int


GPU_SIZES = {
    "full": GpuSizes(requests=256, prompt=128, new_tokens=128, peft_requests=32, batch1_tokens=256,
                     host_batch=64, host_tokens=96),
    "quick": GpuSizes(requests=128, prompt=128, new_tokens=48, peft_requests=16, batch1_tokens=96,
                      host_batch=64, host_tokens=40),
    "smoke": GpuSizes(requests=24, prompt=16, new_tokens=8, peft_requests=8, batch1_tokens=12,
                      host_batch=8, host_tokens=8),
}  # fmt: skip


def make_model(root: Path, shape: Shape, seed: int, dtype: torch.dtype, device: torch.device) -> Path:
    """A random-weight Llama-shaped model with a word-level tokenizer covering its vocab
    (built on ``device``: initializing a 1B model on the CPU is slow); kept in ``root``."""
    path = root / "base"
    if (path / "config.json").is_file():
        return path
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
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    logger.info("model: %.1fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return path


def make_adapters(root: Path, base: Path, n: int, rank: int, seed: int, device: torch.device) -> list[Path]:
    """n rank-``rank`` adapters on all seven projections, random non-zero weights (kept in ``root``)."""
    paths = [root / f"adapter{i}" for i in range(n)]
    if all((p / "adapter_config.json").is_file() for p in paths):
        return paths
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32 if device.type == "cpu" else None)
    model = model.to(device)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    for i, path in enumerate(paths):
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        peft_model.save_pretrained(path)
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


def gpu_workload(rng: np.random.Generator, vocab: int, sizes: GpuSizes, n_adapters: int) -> list[Req]:
    """Decode-heavy: ``sizes.requests`` requests over the adapters (uniform, round-robin)."""
    return [
        Req(rng.integers(4, vocab, sizes.prompt).tolist(), sizes.new_tokens, i % n_adapters)
        for i in range(sizes.requests)
    ]


def _params(r: Req) -> SamplingParams:
    return SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)


def run_engine(engine: LLMEngine, reqs: list[Req], use_adapters: bool) -> tuple[float, int]:
    """Submit every request at once, ``step()`` to completion; return (seconds, generated tokens)."""
    for i, r in enumerate(reqs):
        engine.add_request(f"r{i}", r.prompt, _params(r), lora_id=f"a{r.adapter}" if use_adapters else None)
    generated = 0
    _sync(engine.device)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += out.completion_tokens
    _sync(engine.device)
    return time.perf_counter() - start, generated


@dataclass
class TokenRun:
    seconds: float
    tokens: int
    step_seconds: list[float]
    """Wall time of each step."""
    wait_seconds: list[float]
    """Time each step waited for the device (in the sampler's sync)."""
    batch: list[int]
    """Sequences running during each step."""


def run_engine_tokens(engine: LLMEngine, reqs: list[Req], use_adapters: bool) -> TokenRun:
    """The engine thread's loop (``step_tokens``: no detokenization), timing every step."""
    for i, r in enumerate(reqs):
        seq = engine.make_request(f"t{i}", r.prompt, _params(r), f"a{r.adapter}" if use_adapters else None)
        engine.enqueue(seq)
    run = TokenRun(0.0, 0, [], [], [])
    sampler = engine.sampler
    _sync(engine.device)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        batch = engine.stats.num_running + engine.stats.num_waiting
        waited, t0 = sampler.wait_seconds, time.perf_counter()
        outputs = engine.step_tokens()
        run.step_seconds.append(time.perf_counter() - t0)
        run.wait_seconds.append(sampler.wait_seconds - waited)
        run.batch.append(batch)
        run.tokens += sum(len(out.token_ids) for out in outputs)
    _sync(engine.device)
    run.seconds = time.perf_counter() - start
    return run


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


def run_transformers_cb(base: Path, reqs: list[Req], device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """transformers' continuous batching (``generate_batch``) on the base model, no adapters.

    The first call builds the manager for this workload (cache sizing, CUDA-graph warm-up)
    and keeps it; the second, timed, reuses it."""
    from transformers.generation import ContinuousBatchingConfig

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    new = max(r.max_tokens for r in reqs)
    gen = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(max_batch_tokens=4096)
    prompts = [r.prompt for r in reqs]
    model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb, persistent_manager=True)
    _sync(device)
    start = time.perf_counter()
    out = model.generate_batch(
        prompts, generation_config=gen, continuous_batching_config=cb, persistent_manager=True, warmup=False
    )
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    destroy = getattr(model, "destroy_cached_continuous_batching_manager", None)
    if destroy is not None:
        destroy()
    del model
    return seconds, tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_engine(
    base: Path, adapters: list[Path], device: str, dtype: str, max_seqs: int, rank: int,
    kv_gb: float, cuda_graphs: bool = True,
) -> LLMEngine:  # fmt: skip
    config = EngineConfig(
        model=ModelConfig(model=str(base), device=device, dtype=dtype, cuda_graphs=cuda_graphs),
        lora=LoRAConfig(max_lora_rank=rank, max_loras=max(1, len(adapters))),
        cache=CacheConfig(kv_cache_memory_gb=kv_gb),
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
) -> dict:
    """Interleave the three runs ``repeat`` times and keep each one's fastest (least disturbed)."""
    warm = reqs[:4]
    run_engine(engine, [Req(r.prompt, 4, r.adapter) for r in warm], True)  # warm-up
    runs: dict[str, list[tuple[float, int]]] = {"a": [], "b": [], "c": []}
    for _ in range(repeat):
        runs["a"].append(run_engine(engine, reqs, True))
        runs["b"].append(run_engine(engine, reqs, False))
        runs["c"].append(run_peft(peft_model, reqs, 32, device))
    (t_a, n_a), (t_b, n_b), (t_c, n_c) = (min(runs[k]) for k in "abc")
    row = {
        "workload": name, "requests": len(reqs),
        "a_tok_s": n_a / t_a, "b_tok_s": n_b / t_b, "c_tok_s": n_c / t_c,
        "a_over_b": (n_a / t_a) / (n_b / t_b), "a_over_c": (n_a / t_a) / (n_c / t_c),
        "a_s": t_a, "b_s": t_b, "c_s": t_c, "tokens": n_a,
    }  # fmt: skip
    logger.info("%s done: %s", name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    return row


def cpu_main(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_model(root, CPU_SHAPE, args.seed, torch.float32, device)
        adapters = make_adapters(root, base, 32, 16, args.seed + 1, device)
        engine = build_engine(base, adapters, "cpu", "float32", 128, 16, kv_gb=2.0)
        peft_model = build_peft(base, adapters, device, torch.float32)
        all_w = {"uniform": uniform_workload(rng, CPU_SHAPE.vocab), "mixed": mixed_workload(rng, CPU_SHAPE.vocab)}
        workloads = {k: all_w[k] for k in args.workloads.split(",")}
        rows = [measure(name, engine, peft_model, reqs, device, args.repeat) for name, reqs in workloads.items()]
    print(f"\nmachine: {platform.node()} {platform.machine()} torch {torch.__version__} "
          f"threads {torch.get_num_threads()} device cpu")  # fmt: skip
    print(f"{'workload':<10}{'(a) lora tok/s':>16}{'(b) base tok/s':>16}{'(c) peft tok/s':>16}{'a/b':>8}{'a/c':>8}")
    for r in rows:
        print(f"{r['workload']:<10}{r['a_tok_s']:>16.1f}{r['b_tok_s']:>16.1f}{r['c_tok_s']:>16.1f}"
              f"{r['a_over_b']:>8.2f}{r['a_over_c']:>8.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


# ---- --gpu (and --cpu-smoke) ---------------------------------------------------------------------


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (median of 10)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * n / float(np.median(times[2:]))


def weight_bytes_per_token(engine: LLMEngine, adapter_rank: int) -> int:
    """Bytes of weights one decode token reads: every parameter but the input embedding
    (one row of it) plus one adapter's A and B on each wrapped projection."""
    model = engine.model
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    total += embed.shape[1] * embed.element_size()
    for layer in engine.lora_manager.layers.values():
        total += adapter_rank * (layer.in_features + layer.out_features) * layer.lora_a.element_size()
    return total


@contextmanager
def _timed(label: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    logger.info("%s: %.1f s", label, time.perf_counter() - start)


def gpu_main(args: argparse.Namespace) -> None:
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    sizes = GPU_SIZES["smoke" if smoke else "quick" if args.quick else "full"]
    shape, dtype = (SMOKE_SHAPE, torch.float32) if smoke else (GPU_SHAPE, torch.bfloat16)
    n_adapters, rank = (8 if smoke else 32), 16
    rng = np.random.default_rng(args.seed)
    figures: dict[str, float | str] = {"device": torch.cuda.get_device_name() if not smoke else "cpu (smoke)"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.model_cache) if args.model_cache else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        with _timed("model and adapters"):
            base = make_model(root, shape, args.seed, dtype, device)
            adapters = make_adapters(root, base, n_adapters, rank, args.seed + 1, device)
        with _timed("engine"):
            engine = build_engine(
                base, adapters, device.type, str(dtype).removeprefix("torch."), 256, rank,
                kv_gb=1.0 if smoke else 24.0, cuda_graphs=not args.no_cuda_graphs,
            )  # fmt: skip
        graphs = engine.runner.graphs
        figures["graphs"] = "on" if graphs is not None and graphs.capture else "off"
        reqs = gpu_workload(rng, shape.vocab, sizes, n_adapters)
        with _timed("a/b"):
            figures |= measure_ab(engine, reqs, args.repeat)
        _save(args.json, figures)
        with _timed("batch-1"):
            figures |= measure_batch1(engine, sizes, rng, shape.vocab, rank)
        _save(args.json, figures)
        with _timed("host"):
            figures |= measure_host(engine, sizes, rng, shape.vocab, n_adapters)
        _save(args.json, figures)
        if graphs is not None:
            figures["graphs_captured"] = graphs.num_captured
        del engine, graphs
        _free(device)
        if not args.skip_transformers:
            with _timed("transformers"):
                figures |= measure_transformers(base, reqs, device, dtype)
            _save(args.json, figures)
            _free(device)
        if not args.skip_peft:
            with _timed("peft"):
                figures |= measure_peft(base, adapters, reqs[: sizes.peft_requests], device, dtype)
    _save(args.json, figures)
    print_gpu_table(figures)


def _save(path: str | None, figures: dict) -> None:
    """Write the figures so far (a time limit may end the run before the last ones)."""
    _ratios(figures)
    logger.info("figures: %s", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    if path:
        Path(path).write_text(json.dumps(figures, indent=2))


def measure_ab(engine: LLMEngine, reqs: list[Req], repeat: int) -> dict[str, float]:
    """(a) and (b), interleaved ``repeat`` times; a warm-up of the same shape first (it
    compiles and tunes the kernels and captures the decode graphs of the batch sizes the
    run goes through)."""
    warm = [Req(r.prompt, min(r.max_tokens, 16), r.adapter) for r in reqs]
    run_engine_tokens(engine, warm, True)
    run_engine_tokens(engine, warm, False)
    a, b = [], []
    for _ in range(repeat):
        a.append(run_engine_tokens(engine, reqs, True))
        b.append(run_engine_tokens(engine, reqs, False))
    best_a = min(a, key=lambda r: r.seconds)
    best_b = min(b, key=lambda r: r.seconds)
    return {"a_tok_s": best_a.tokens / best_a.seconds, "b_tok_s": best_b.tokens / best_b.seconds,
            "a_s": best_a.seconds, "b_s": best_b.seconds, "tokens": best_a.tokens}  # fmt: skip


def measure_batch1(engine: LLMEngine, sizes: GpuSizes, rng: np.random.Generator, vocab: int, rank: int) -> dict:
    """One request with one adapter: decode tokens/s, and the weight bandwidth it implies."""
    req = [Req(rng.integers(4, vocab, 16).tolist(), sizes.batch1_tokens, 0)]
    run_engine_tokens(engine, req, True)  # warm-up (captures the batch-1 graph)
    run = run_engine_tokens(engine, req, True)
    decode_s = sum(run.step_seconds[1:])  # the first step is the prefill
    tok_s = (run.tokens - 1) / decode_s
    weights = weight_bytes_per_token(engine, rank)
    copy = copy_bandwidth(engine.device)
    return {"batch1_tok_s": tok_s, "weight_bytes_per_token": weights, "weight_bytes_per_s": weights * tok_s,
            "copy_bytes_per_s": copy, "weight_bw_over_copy": weights * tok_s / copy}  # fmt: skip


def measure_host(engine: LLMEngine, sizes: GpuSizes, rng: np.random.Generator, vocab: int, n_adapters: int) -> dict:
    """Host time per decode step at batch ``sizes.host_batch`` over all adapters."""
    reqs = [Req(rng.integers(4, vocab, 16).tolist(), sizes.host_tokens, i % n_adapters) for i in range(sizes.host_batch)]
    run_engine_tokens(engine, [Req(r.prompt, 8, r.adapter) for r in reqs], True)  # warm-up
    run = run_engine_tokens(engine, reqs, True)
    steps = [i for i, n in enumerate(run.batch) if n == sizes.host_batch][2:]  # full-batch decode steps
    host = [run.step_seconds[i] - run.wait_seconds[i] for i in steps]
    return {"host_ms_per_step": 1e3 * float(np.median(host)), "host_steps": len(steps), "host_batch": sizes.host_batch,
            "step_ms": 1e3 * float(np.median([run.step_seconds[i] for i in steps]))}  # fmt: skip


def measure_peft(base: Path, adapters: list[Path], reqs: list[Req], device: torch.device, dtype: torch.dtype) -> dict:
    peft_model = build_peft(base, adapters, device, dtype)
    run_peft(peft_model, [Req(r.prompt, 2, r.adapter) for r in reqs[:2]], 32, device)  # warm-up
    seconds, tokens = run_peft(peft_model, reqs, 32, device)
    del peft_model
    return {"c_tok_s": tokens / seconds, "c_requests": len(reqs)}


def measure_transformers(base: Path, reqs: list[Req], device: torch.device, dtype: torch.dtype) -> dict:
    try:
        seconds, tokens = run_transformers_cb(base, reqs, device, dtype)
    except Exception as exc:  # an older or newer transformers: report, do not lose the other figures
        logger.exception("transformers generate_batch failed")
        return {"d_error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
    return {"d_tok_s": tokens / seconds}


def _ratios(f: dict) -> None:
    if "a_tok_s" in f and "b_tok_s" in f:
        f["a_over_b"] = f["a_tok_s"] / f["b_tok_s"]
    if "a_tok_s" in f and "c_tok_s" in f:
        f["a_over_c"] = f["a_tok_s"] / f["c_tok_s"]
    if "b_tok_s" in f and "d_tok_s" in f:
        f["b_over_d"] = f["b_tok_s"] / f["d_tok_s"]


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_gpu_table(f: dict) -> None:
    def val(key: str, fmt: str) -> str:
        v = f.get(key)
        return format(v, fmt) if isinstance(v, float | int) else "n/a"

    rows = [
        ("(a) peftserve + adapters, tok/s", val("a_tok_s", ".0f"), ""),
        ("(b) peftserve, no adapters, tok/s", val("b_tok_s", ".0f"), ""),
        ("(c) PEFT mixed-adapter generate, tok/s", val("c_tok_s", ".0f"), ""),
        ("(d) transformers generate_batch, tok/s", val("d_tok_s", ".0f"), f.get("d_error", "")),
        ("a/b", val("a_over_b", ".2f"), ">= 0.90"),
        ("a/c", val("a_over_c", ".1f"), ">= 10"),
        ("b/d", val("b_over_d", ".2f"), ">= 1.5"),
        ("batch-1 decode, tok/s", val("batch1_tok_s", ".0f"), ""),
        ("batch-1 weight GB/s", f"{f['weight_bytes_per_s'] / 1e9:.0f}" if "weight_bytes_per_s" in f else "n/a", ""),
        ("copy GB/s (read+write)", f"{f['copy_bytes_per_s'] / 1e9:.0f}" if "copy_bytes_per_s" in f else "n/a", ""),
        ("batch-1 weight bw / copy bw", val("weight_bw_over_copy", ".1%"), ">= 60%"),
        (f"host ms per decode step (batch {f.get('host_batch')})", val("host_ms_per_step", ".3f"), "< 1 ms"),
    ]
    print(f"\nmachine: {platform.node()} torch {torch.__version__} device {f['device']} "
          f"cuda graphs {f.get('graphs')}")  # fmt: skip
    for name, value, target in rows:
        print(f"{name:<42}{value:>12}  {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the GPU figures (1B-class model on CUDA)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the --gpu code paths on the CPU, tiny model")
    parser.add_argument("--quick", action="store_true", help="with --gpu: fewer requests and tokens")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="with --gpu: decode eagerly")
    parser.add_argument("--skip-peft", action="store_true", help="with --gpu: no (c)")
    parser.add_argument("--skip-transformers", action="store_true", help="with --gpu: no (d)")
    parser.add_argument("--model-cache", help="with --gpu: keep the generated model and adapters here (reused)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workloads", default="uniform,mixed", help="CPU: comma list of uniform, mixed")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved repetitions; the fastest counts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(args.seed)
    if args.gpu or args.cpu_smoke:
        if args.gpu and not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device (try --cpu-smoke)")
        args.repeat = args.repeat or (1 if args.cpu_smoke or args.quick else 2)
        gpu_main(args)
    else:
        args.repeat = args.repeat or 1
        cpu_main(args)


if __name__ == "__main__":
    main()
