"""LoRA kernel benchmark: Triton shrink+expand vs the torch reference vs a PEFT-style loop.

A program, not a test. For each case (tokens T, rank, distinct adapters; hidden 4096, bf16,
zipf adapter popularity, every adapter present at least once when T allows) it times one
``add_lora`` (x -> out += B(A x) per token's adapter) four ways, all in one run:

  triton  TritonBackend.add_lora, eager (two launches)
  graph   the same captured in a CUDA graph, per call (launch overhead gone)
  torch   TorchBackend.add_lora, the reference backend (a host loop over segments)
  peft    a PEFT-style loop: per adapter, find its tokens, x @ A^T @ B^T * scale, index_add

next to the device's copy bandwidth (bytes read + written) and bf16 matmul rate, measured
at the start of the same run. Times are medians from ``triton.testing.do_bench`` (which
clears the L2 cache before every timed call); every method also rotates through enough
input sets (activations, outputs and adapter stacks) to exceed the L2 several times, so
the graph replays, which get no clearing, read from memory too.

    python bench/kernels.py             # full grid, about 2 minutes on an H100
    python bench/kernels.py --quick     # a smaller grid
    python bench/kernels.py --smoke     # tiny shapes; runs on CPU (TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402
from peftserve.kernels import lora_expand, lora_shrink  # noqa: E402

from peftserve.lora.backend import TorchBackend  # noqa: E402
from peftserve.lora.metadata import LoRAStepMetadata  # noqa: E402
from peftserve.lora.triton_backend import TritonBackend, split_k  # noqa: E402

logger = logging.getLogger("bench.kernels")
HIDDEN = 4096
DTYPE = torch.bfloat16
MAX_SEGMENTS = 256  # the metadata buffer a runner would allocate
L2_TARGET_BYTES = 256 << 20  # rotate input sets until they span this much memory
MAX_SETS = 32


@dataclass
class Case:
    phase: str
    tokens: int
    rank: int
    adapters: int
    hidden: int = HIDDEN


@dataclass
class Row:
    phase: str
    tokens: int
    hidden: int
    rank: int
    adapters: int
    segments: int
    sets: int
    triton_us: float
    graph_us: float
    shrink_us: float
    expand_us: float
    host_us: float
    torch_us: float
    peft_us: float
    bytes: int
    flops: int
    shrink_config: str
    expand_config: str


def grid(quick: bool, smoke: bool) -> list[Case]:
    """The sampled grid: adapter-count sweep at rank 16, rank sweep at 32 adapters."""
    if smoke:
        return [Case("decode", 3, 8, 2, hidden=64), Case("decode", 17, 12, 4, hidden=96)]
    if quick:
        tokens, counts, rank_tokens, ranks = [16, 256, 4096], [1, 32], [256], [64, 128]
    else:
        tokens, counts = [1, 16, 64, 256, 1024, 4096, 8192], [1, 8, 32, 128]
        rank_tokens, ranks = [64, 256, 4096], [8, 64, 128]
    cases = [Case("decode" if t <= 256 else "prefill", t, 16, n)
             for t in tokens for n in counts if n <= t]
    cases += [Case("decode" if t <= 256 else "prefill", t, r, 32) for t in rank_tokens for r in ranks]
    return cases


def token_slots(num_tokens: int, adapters: int, gen: torch.Generator) -> list[int]:
    """Slots 1..adapters, zipf-popular, each present once when possible, grouped by slot."""
    base = list(range(1, adapters + 1))[:num_tokens]
    weights = torch.tensor([1.0 / k**1.1 for k in range(1, adapters + 1)])
    if num_tokens == len(base):
        return base
    extra = torch.multinomial(weights, num_tokens - len(base), replacement=True, generator=gen) + 1
    return sorted(base + extra.tolist())


class InputSet:
    """One set of everything a call reads or writes, so sets can rotate."""

    def __init__(self, case: Case, r_max: int, gen: torch.Generator) -> None:
        slots, t, h = case.adapters + 1, case.tokens, case.hidden

        def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
            x = torch.randn(*shape, generator=gen, device=gen.device, dtype=torch.float32)
            return (x * scale).to(DTYPE)

        self.x = rand(t, h)  # [T, H]
        self.out = rand(t, h)  # [T, H]
        self.lora_a = rand(slots, r_max, h, scale=h**-0.5)  # [S, r_max, H]
        self.lora_b = rand(slots, h, r_max, scale=case.rank**-0.5)  # [S, H, r_max]
        self.lora_a[:, case.rank :] = 0
        self.lora_b[:, :, case.rank :] = 0
        self.lora_a[0] = 0
        self.lora_b[0] = 0
        # PEFT keeps each adapter's A and B as separate contiguous Linear weights.
        self.peft_a = [self.lora_a[s, : case.rank].contiguous() for s in range(slots)]  # [r, H]
        self.peft_b = [self.lora_b[s, :, : case.rank].contiguous() for s in range(slots)]  # [H, r]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.out, self.lora_a, self.lora_b))


def peft_style(x: torch.Tensor, out: torch.Tensor, peft_a: list[torch.Tensor],
               peft_b: list[torch.Tensor], token_adapter: torch.Tensor, adapters: list[int],
               scale: float = 1.0) -> None:
    """What PEFT's mixed-batch forward does per layer: one masked sub-batch per adapter."""
    for a in adapters:
        idx = (token_adapter == a).nonzero().squeeze(1)  # [n], a host sync, as in PEFT
        sub = x.index_select(0, idx)  # [n, H]
        delta = (sub @ peft_a[a].T) @ peft_b[a].T  # [n, H], in the model dtype like nn.Linear
        out.index_add_(0, idx, delta * scale)


def bench_ms(fn, cuda: bool) -> float:
    """Median milliseconds of ``fn``: do_bench on CUDA, a host clock elsewhere (smoke only)."""
    if cuda:
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def host_us(fn, cuda: bool, calls: int = 100) -> float:
    """Host time of one call (Python and launch; the device runs behind, unsynchronized)."""
    fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def graph_ms(calls: list, reps: int = 20) -> float:
    """Per-call milliseconds of ``calls`` captured into one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up on the capture stream
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / len(calls)


def ceilings(device: torch.device) -> dict[str, float]:
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    n = 256 << 20  # 512 MiB of bf16 per side
    src = torch.randn(n, device=device, dtype=DTYPE)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), True)
    m = 8192
    a = torch.randn(m, m, device=device, dtype=DTYPE)
    b = torch.randn(m, m, device=device, dtype=DTYPE)
    mm_ms = bench_ms(lambda: a @ b, True)
    return {"copy_bytes_per_s": 2 * n * 2 / (copy_ms * 1e-3), "bf16_flops": 2 * m**3 / (mm_ms * 1e-3)}


def run_case(case: Case, device: torch.device, seed: int) -> Row:
    cuda = device.type == "cuda"
    gen = torch.Generator(device).manual_seed(seed)
    r_max = max(64, case.rank)
    slots = token_slots(case.tokens, case.adapters, torch.Generator().manual_seed(seed))
    first = InputSet(case, r_max, gen)
    n_sets = 1 if not cuda else max(1, min(MAX_SETS, math.ceil(L2_TARGET_BYTES / first.nbytes())))
    sets = [first] + [InputSet(case, r_max, gen) for _ in range(n_sets - 1)]
    meta = LoRAStepMetadata(case.tokens, MAX_SEGMENTS, device)
    meta.prepare(slots)
    ranks = [0] + [case.rank] * case.adapters
    token_adapter = torch.tensor(slots, device=device)
    present = sorted(set(slots))
    tri, ref = TritonBackend(), TorchBackend()

    def rotating(method):
        cycle = itertools.cycle(sets)
        return lambda: method(next(cycle))

    def triton_call(s: InputSet) -> None:
        tri.add_lora(s.x, s.out, s.lora_a, s.lora_b, ranks, meta)

    def torch_call(s: InputSet) -> None:
        ref.add_lora(s.x, s.out, s.lora_a, s.lora_b, ranks, meta)

    def peft_call(s: InputSet) -> None:
        peft_style(s.x, s.out, s.peft_a, s.peft_b, token_adapter, present)

    triton_call(first)  # autotune this shape before timing and capture
    split = split_k(case.tokens)
    slot_ranks = torch.tensor(ranks, dtype=torch.int32, device=device)
    segs = (meta.seg_start, meta.seg_len, meta.seg_slot)
    ys = [torch.randn(split, case.tokens, r_max, device=device) for _ in sets]  # [split, T, r_max]

    def shrink_call(s: InputSet, y: torch.Tensor) -> None:
        lora_shrink(s.x, s.lora_a, slot_ranks, *segs, y)

    def expand_call(s: InputSet, y: torch.Tensor) -> None:
        lora_expand(y, s.lora_b, slot_ranks, *segs, s.out)

    pairs = list(zip(sets, ys, strict=True))
    graphs = [
        graph_ms([lambda s=s: triton_call(s) for s in sets]),
        graph_ms([lambda s=s, y=y: shrink_call(s, y) for s, y in pairs]),
        graph_ms([lambda s=s, y=y: expand_call(s, y) for s, y in pairs]),
    ] if cuda else [math.nan] * 3
    row = Row(
        phase=case.phase, tokens=case.tokens, hidden=case.hidden, rank=case.rank,
        adapters=case.adapters,
        segments=meta.num_segments, sets=n_sets,
        triton_us=1e3 * bench_ms(rotating(triton_call), cuda),
        graph_us=1e3 * graphs[0],
        shrink_us=1e3 * graphs[1],
        expand_us=1e3 * graphs[2],
        host_us=host_us(rotating(triton_call), cuda),
        torch_us=1e3 * bench_ms(rotating(torch_call), cuda),
        peft_us=1e3 * bench_ms(rotating(peft_call), cuda),
        bytes=min_bytes(case, len(present)), flops=4 * case.tokens * case.hidden * case.rank,
        shrink_config=best_config("lora_shrink", "_shrink_kernel"),
        expand_config=best_config("lora_expand", "_expand_kernel"),
    )
    return row


def min_bytes(case: Case, used: int) -> int:
    """Fewest bytes one call moves: x, the used adapters' A and B, out read and written,
    and the fp32 intermediate written and read back."""
    t, h, r, e = case.tokens, case.hidden, case.rank, 2
    return t * h * e + 2 * used * r * h * e + 2 * t * h * e + 2 * t * r * 4


def best_config(module: str, kernel: str) -> str:
    tuned = getattr(sys.modules[f"peftserve.kernels.{module}"], kernel)
    cfg = getattr(tuned, "best_config", None)
    if cfg is None:
        return "-"
    kw = cfg.kwargs
    return "x".join(str(v) for v in kw.values()) + f"/w{cfg.num_warps}s{cfg.num_stages}"


def table(rows: list[Row], ceil: dict[str, float] | None) -> str:
    head = (f"{'phase':<7} {'T':>5} {'r':>3} {'ad':>3} {'seg':>3} | {'eager':>7} {'graph':>6} "
            f"{'shrink':>6} {'expand':>6} {'host':>5} | {'torch':>7} {'peft':>7} us | "
            f"{'GB/s':>5} {'%copy':>5} {'TF/s':>5} | {'xtorch':>6} {'xpeft':>6} | shrink, expand config")
    lines = [head, "-" * len(head)]
    for r in rows:
        kernel_us = r.graph_us if not math.isnan(r.graph_us) else r.triton_us
        gbs = r.bytes / (kernel_us * 1e-6) / 1e9
        pct = 100 * gbs * 1e9 / ceil["copy_bytes_per_s"] if ceil else math.nan
        lines.append(
            f"{r.phase:<7} {r.tokens:>5} {r.rank:>3} {r.adapters:>3} {r.segments:>3} | "
            f"{r.triton_us:>7.1f} {r.graph_us:>6.1f} {r.shrink_us:>6.1f} {r.expand_us:>6.1f} "
            f"{r.host_us:>5.0f} | {r.torch_us:>7.0f} {r.peft_us:>7.0f}    | "
            f"{gbs:>5.0f} {pct:>5.1f} {r.flops / (kernel_us * 1e-6) / 1e12:>5.1f} | "
            f"{r.torch_us / r.triton_us:>6.1f} {r.peft_us / r.triton_us:>6.1f} | "
            f"{r.shrink_config}, {r.expand_config}"
        )
    if ceil:
        lines.append(
            f"device ceilings, this run: copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s (read+write), "
            f"bf16 matmul {ceil['bf16_flops'] / 1e12:.0f} TFLOP/s. eager: add_lora as called (host "
            "overhead included); graph: the same replayed from a CUDA graph (shrink, expand: each "
            "alone); host: CPU time per eager call. GB/s, %copy, TF/s: fewest bytes and FLOPs over "
            "the graph time. xtorch, xpeft: their time over eager."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU ok): checks the program runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write rows and ceilings to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("needs CUDA (use --smoke to exercise the program on CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    started = time.time()
    ceil = ceilings(device) if cuda else None
    if ceil:
        logger.info("%s: copy %.0f GB/s, bf16 matmul %.0f TFLOP/s", torch.cuda.get_device_name(),
                    ceil["copy_bytes_per_s"] / 1e9, ceil["bf16_flops"] / 1e12)
    rows = []
    for i, case in enumerate(grid(args.quick, args.smoke)):
        rows.append(run_case(case, device, args.seed + i))
        r = rows[-1]
        logger.info("%s T=%d r=%d adapters=%d: triton %.1f us, graph %.1f, torch %.1f, peft %.1f",
                    r.phase, r.tokens, r.rank, r.adapters, r.triton_us, r.graph_us, r.torch_us, r.peft_us)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"device": torch.cuda.get_device_name() if cuda else "cpu", "ceilings": ceil,
             "rows": [asdict(r) for r in rows]}, indent=1))
    logger.info("total %.0f s", time.time() - started)
    print(table(rows, ceil))


if __name__ == "__main__":
    main()
