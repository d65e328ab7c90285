"""Kernel benchmark: Triton LoRA (two launches, fused) and paged attention vs their peers.

A program, not a test. For each LoRA case (tokens T, rank, distinct adapters; hidden 4096,
bf16, zipf adapter popularity, every adapter present at least once when T allows) it times
one ``add_lora`` (x -> out += B(A x) per token's adapter) these ways, all in one run:

  triton  TritonBackend.add_lora with the two-launch path (segmented shrink, then expand), eager
  graph   the same captured in a CUDA graph, per call (launch overhead gone)
  fused   the single-launch shrink+expand (T <= 128: what the backend runs for decode), graph
  torch   TorchBackend.add_lora, the reference backend (a host loop over segments)
  peft    a PEFT-style loop: per adapter, find its tokens, x @ A^T @ B^T * scale, index_add

then q/k/v as three slices of one fused launch against three separate launches, and the
paged attention kernel (decode: split over the context; mixed prefill: one varlen launch)
against the torch path (gather into a workspace, then SDPA), with its achieved bandwidth.

next to the device's copy bandwidth (bytes read + written) and bf16 matmul rate, measured
at the start of the same run. Times are medians from ``triton.testing.do_bench`` (which
clears the L2 cache before every timed call); every method also rotates through enough
input sets (activations, outputs and adapter stacks) to exceed the L2 several times, so
the graph replays, which get no clearing, read from memory too.

    python bench/kernels.py             # full grid, about 2 minutes on an H100
    python bench/kernels.py --quick     # a smaller grid
    python bench/kernels.py --smoke     # tiny shapes; runs on CPU (TRITON_INTERPRET=1)
    python bench/kernels.py --only attention   # one section: lora, sliced or attention
"""

from __future__ import annotations

import argparse
import functools
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

# This file is named like the hub `kernels` package that `import transformers` probes for:
# when another script of bench/ runs (bench/ is then on the import path), transformers imports
# this file under that name. So the module itself imports nothing that imports transformers
# (the attention section imports it when it runs) and changes nothing; run as a script, it
# keeps its own folder off the path.
if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    if not torch.cuda.is_available():  # must precede the first triton import
        os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402
from peftserve.kernels import lora_expand, lora_shrink, paged_attention  # noqa: E402

from peftserve.lora.backend import TorchBackend  # noqa: E402
from peftserve.lora.layers import LoRAStack  # noqa: E402
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
    fused_us: float
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
    if quick:  # the decode case (T=64, 32 adapters, rank 16) is in both grids
        tokens, counts, rank_tokens, ranks = [64, 4096], [1, 32], [256], [64]
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

    def __init__(self, case: Case, r_max: int, gen: torch.Generator, slices: tuple[int, ...] | None = None) -> None:
        slots, t, h = case.adapters + 1, case.tokens, case.hidden
        slices = slices or (h,)

        def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
            x = torch.randn(*shape, generator=gen, device=gen.device, dtype=torch.float32)
            return (x * scale).to(DTYPE)

        self.x = rand(t, h)  # [T, H]
        self.out = rand(t, sum(slices))  # [T, N]
        self.stack = LoRAStack(h, slices, slots, r_max, DTYPE, gen.device)
        self.stack.lora_a.copy_(rand(slots, len(slices), r_max, h, scale=h**-0.5))  # [S, NS, r_max, H]
        self.stack.lora_b.copy_(rand(slots, sum(slices), r_max, scale=case.rank**-0.5))  # [S, N, r_max]
        self.stack.lora_a[:, :, case.rank :] = 0
        self.stack.lora_b[:, :, case.rank :] = 0
        self.stack.lora_a[0] = 0
        self.stack.lora_b[0] = 0
        self.stack.ranks = [[0] + [case.rank] * case.adapters for _ in slices]
        self.stack.slot_ranks.copy_(torch.tensor(self.stack.ranks, dtype=torch.int32).T)
        self.lora_a = self.stack.lora_a[:, 0]  # [S, r_max, H] (first slice)
        self.lora_b = self.stack.lora_b  # [S, N, r_max]
        # PEFT keeps each adapter's A and B as separate contiguous Linear weights.
        self.peft_a = [self.lora_a[s, : case.rank].contiguous() for s in range(slots)]  # [r, H]
        self.peft_b = [self.lora_b[s, :, : case.rank].contiguous() for s in range(slots)]  # [N, r]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.out, self.stack.lora_a, self.stack.lora_b))


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
    calls = calls if cuda else 2  # the interpreter (smoke runs) executes every call
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
    token_adapter = torch.tensor(slots, device=device)
    present = sorted(set(slots))
    tri, fused, ref = TritonBackend(fused_max_tokens=0), TritonBackend(), TorchBackend()
    can_fuse = case.tokens <= fused.fused_max_tokens

    def rotating(method):
        cycle = itertools.cycle(sets)
        return lambda: method(next(cycle))

    def triton_call(s: InputSet) -> None:
        tri.add_lora(s.x, s.out, s.stack, meta)

    def fused_call(s: InputSet) -> None:
        fused.add_lora(s.x, s.out, s.stack, meta)

    def torch_call(s: InputSet) -> None:
        ref.add_lora(s.x, s.out, s.stack, meta)

    def peft_call(s: InputSet) -> None:
        peft_style(s.x, s.out, s.peft_a, s.peft_b, token_adapter, present)

    triton_call(first)  # autotune this shape before timing and capture
    if can_fuse:
        fused_call(first)
    split = split_k(case.tokens)
    slot_ranks = first.stack.slot_ranks[:, 0].contiguous()  # [S] int32
    segs = (meta.seg_start, meta.seg_len, meta.seg_slot)
    ys = [torch.randn(split, case.tokens, r_max, device=device) for _ in sets]  # [split, T, r_max]

    def shrink_call(s: InputSet, y: torch.Tensor) -> None:
        lora_shrink(s.x, s.lora_a, slot_ranks, *segs, y)

    def expand_call(s: InputSet, y: torch.Tensor) -> None:
        lora_expand(y, s.lora_b, slot_ranks, *segs, s.out)

    pairs = list(zip(sets, ys, strict=True))
    graphs = [
        graph_ms([lambda s=s: triton_call(s) for s in sets]),
        graph_ms([lambda s=s: fused_call(s) for s in sets]) if can_fuse else math.nan,
        graph_ms([lambda s=s, y=y: shrink_call(s, y) for s, y in pairs]),
        graph_ms([lambda s=s, y=y: expand_call(s, y) for s, y in pairs]),
    ] if cuda else [math.nan] * 4
    row = Row(
        phase=case.phase, tokens=case.tokens, hidden=case.hidden, rank=case.rank,
        adapters=case.adapters,
        segments=meta.num_segments, sets=n_sets,
        triton_us=1e3 * bench_ms(rotating(triton_call), cuda),
        graph_us=1e3 * graphs[0],
        fused_us=1e3 * (graphs[1] if cuda else bench_ms(rotating(fused_call), cuda) if can_fuse else math.nan),
        shrink_us=1e3 * graphs[2],
        expand_us=1e3 * graphs[3],
        host_us=host_us(rotating(fused_call if can_fuse else triton_call), cuda),
        torch_us=1e3 * bench_ms(rotating(torch_call), cuda),
        peft_us=1e3 * bench_ms(rotating(peft_call), cuda),
        bytes=min_bytes(case, len(present)), flops=4 * case.tokens * case.hidden * case.rank,
        shrink_config=best_config("lora_shrink", "_shrink_kernel"),
        expand_config=best_config("lora_expand", "_expand_kernel"),
    )
    return row


def min_bytes(case: Case, used: int, intermediate: bool = False) -> int:
    """Fewest bytes one call moves: x, the used adapters' A and B, out read and written
    (and, for the two-launch path, the fp32 intermediate written and read back)."""
    t, h, r, e = case.tokens, case.hidden, case.rank, 2
    return t * h * e + 2 * used * r * h * e + 2 * t * h * e + (2 * t * r * 4 if intermediate else 0)


def best_config(module: str, kernel: str) -> str:
    tuned = getattr(sys.modules[f"peftserve.kernels.{module}"], kernel)
    cfg = getattr(tuned, "best_config", None)
    if cfg is None:
        return "-"
    kw = cfg.kwargs
    return "x".join(str(v) for v in kw.values()) + f"/w{cfg.num_warps}s{cfg.num_stages}"


def table(rows: list[Row], ceil: dict[str, float] | None) -> str:
    head = (f"{'phase':<7} {'T':>5} {'r':>3} {'ad':>3} {'seg':>3} | {'eager':>7} {'graph':>6} {'fused':>6} "
            f"{'shrink':>6} {'expand':>6} {'host':>5} | {'torch':>7} {'peft':>7} us | "
            f"{'GB/s':>5} {'%copy':>5} {'%fused':>6} {'TF/s':>5} | {'xtorch':>6} {'xpeft':>6} | shrink, expand config")
    lines = [head, "-" * len(head)]
    copy = ceil["copy_bytes_per_s"] if ceil else math.nan
    for r in rows:
        kernel_us = r.graph_us if not math.isnan(r.graph_us) else r.triton_us
        two_bytes = r.bytes + 2 * r.tokens * r.rank * 4  # + the fp32 intermediate, written and read
        gbs = two_bytes / (kernel_us * 1e-6) / 1e9
        fused_pct = 100 * r.bytes / (r.fused_us * 1e-6) / copy
        best_us = min(r.triton_us, r.fused_us) if not math.isnan(r.fused_us) else r.triton_us
        lines.append(
            f"{r.phase:<7} {r.tokens:>5} {r.rank:>3} {r.adapters:>3} {r.segments:>3} | "
            f"{r.triton_us:>7.1f} {r.graph_us:>6.1f} {r.fused_us:>6.1f} {r.shrink_us:>6.1f} {r.expand_us:>6.1f} "
            f"{r.host_us:>5.0f} | {r.torch_us:>7.0f} {r.peft_us:>7.0f}    | "
            f"{gbs:>5.0f} {100 * gbs * 1e9 / copy:>5.1f} {fused_pct:>6.1f} {r.flops / (kernel_us * 1e-6) / 1e12:>5.1f} | "
            f"{r.torch_us / best_us:>6.1f} {r.peft_us / best_us:>6.1f} | "
            f"{r.shrink_config}, {r.expand_config}"
        )
    if ceil:
        lines.append(
            f"device ceilings, this run: copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s (read+write), "
            f"bf16 matmul {ceil['bf16_flops'] / 1e12:.0f} TFLOP/s. eager: the two-launch add_lora as called "
            "(host overhead included); graph: the same replayed from a CUDA graph (shrink, expand: each "
            "alone); fused: the single launch (T <= 128), graph; host: CPU time per eager call of what the "
            "backend runs. GB/s, %copy, TF/s: fewest bytes and FLOPs over the two-launch graph time; "
            "%fused: over the fused time. xtorch, xpeft: their time over the faster eager Triton call."
        )
    return "\n".join(lines)


# ---- q/k/v as slices of one launch -------------------------------------------------------------


@dataclass
class SlicedRow:
    tokens: int
    adapters: int
    grouped_us: float  # q, k, v: one fused launch over three slices
    separate_us: float  # q, k, v: three fused launches
    two_launch_us: float  # q, k, v: three shrink+expand pairs (six launches)
    torch_us: float  # the torch backend, grouped


def sliced_rows(device: torch.device, smoke: bool, seed: int, quick: bool = False) -> list[SlicedRow]:
    """Llama-3-8B's q/k/v (4096 -> 4096, 1024, 1024), rank 16, 32 adapters: the grouped
    launch against the same work as one launch per projection."""
    cuda = device.type == "cuda"
    h, slices = (64, (64, 16, 16)) if smoke else (4096, (4096, 1024, 1024))
    rows = []
    for t, n in [(3, 2)] if smoke else [(64, 32)] if quick else [(1, 1), (16, 8), (64, 32), (128, 32)]:
        case = Case("decode", t, 16, n, hidden=h)
        gen = torch.Generator(device).manual_seed(seed)
        grouped = InputSet(case, 64, gen, slices)
        separate = [InputSet(case, 64, gen, (w,)) for w in slices]
        meta = LoRAStepMetadata(t, MAX_SEGMENTS, device)
        meta.prepare(token_slots(t, n, torch.Generator().manual_seed(seed)))
        fused, two, ref = TritonBackend(), TritonBackend(fused_max_tokens=0), TorchBackend()

        def run(backend, sets: list[InputSet], meta: LoRAStepMetadata = meta) -> None:
            for s in sets:
                backend.add_lora(s.x, s.out, s.stack, meta)

        calls = {
            "grouped": functools.partial(run, fused, [grouped]),
            "separate": functools.partial(run, fused, separate),
            "two": functools.partial(run, two, separate),
            "torch": functools.partial(run, ref, [grouped]),
        }
        for call in calls.values():
            call()
        timed = {k: 1e3 * (graph_ms([c]) if cuda and k != "torch" else bench_ms(c, cuda)) for k, c in calls.items()}
        rows.append(SlicedRow(t, n, timed["grouped"], timed["separate"], timed["two"], timed["torch"]))
    return rows


def sliced_table(rows: list[SlicedRow]) -> str:
    head = f"{'T':>5} {'ad':>3} | {'grouped':>8} {'3 fused':>8} {'3 pairs':>8} {'torch':>8} us | {'x3fused':>7} {'x3pairs':>7}"
    lines = ["q/k/v (4096 -> 4096+1024+1024, rank 16) as slices of one launch, CUDA-graph times per layer", head,
             "-" * len(head)]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r.tokens:>5} {r.adapters:>3} | {r.grouped_us:>8.1f} {r.separate_us:>8.1f} {r.two_launch_us:>8.1f} "
            f"{r.torch_us:>8.0f}    | {r.separate_us / r.grouped_us:>7.2f} {r.two_launch_us / r.grouped_us:>7.2f}"
        )
    return "\n".join(lines)


# ---- paged attention ------------------------------------------------------------------------


@dataclass
class AttnRow:
    kind: str
    seqs: int
    context: int
    query: int
    triton_us: float
    graph_us: float
    torch_us: float
    bytes: int


def attention_step(
    specs: list[tuple[int, int]], heads: int, kv_heads: int, dim: int, block_size: int, device: torch.device,
    gen: torch.Generator,
) -> tuple:
    """A random step over a paged cache with shuffled blocks: (PagedAttentionMetadata,
    query [T, H, D], key and value [Hkv, T, D] of this step's rows)."""
    from peftserve.engine.attention import PagedAttentionMetadata
    from peftserve.engine.block_manager import PAD_BLOCK, RESERVED_BLOCKS

    need = [-(-(ctx + n) // block_size) for n, ctx in specs]
    total = RESERVED_BLOCKS + sum(need)
    order = (torch.randperm(sum(need), generator=torch.Generator().manual_seed(0)) + RESERVED_BLOCKS).tolist()
    tables, pos = [], 0
    for k in need:
        tables.append(order[pos : pos + k])
        pos += k
    width = max(need)
    cache = torch.randn(2, kv_heads, total * block_size, dim, generator=gen, device=device).to(DTYPE)
    qsl, lens, slots = [0], [], []
    for (n, ctx), table in zip(specs, tables, strict=True):
        qsl.append(qsl[-1] + n)
        lens.append(ctx + n)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + n)]
    t = qsl[-1]

    def dev(values, dtype=torch.int32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    meta = PagedAttentionMetadata(
        kv_caches=[cache], block_size=block_size, num_tokens=t, num_seqs=len(specs),
        slot_mapping=dev(slots, torch.long), query_start_loc=dev(qsl), seq_lens=dev(lens),
        block_tables=dev([tb + [PAD_BLOCK] * (width - len(tb)) for tb in tables]),
        query_start_loc_host=qsl, seq_lens_host=lens, max_query_len=max(n for n, _ in specs),
        max_seq_len=max(lens), decode_only=all(n == 1 for n, _ in specs),
    )  # fmt: skip
    query = torch.randn(t, heads, dim, generator=gen, device=device).to(DTYPE)
    kv = torch.randn(2, kv_heads, t, dim, generator=gen, device=device).to(DTYPE)
    return meta, query, kv[0], kv[1]


def attention_rows(device: torch.device, smoke: bool, seed: int, quick: bool = False) -> list[AttnRow]:
    """Llama-3-8B attention (32 query heads, 8 KV heads, head dim 128, bf16, 16-token blocks)."""
    from peftserve.engine.attention import torch_paged_attention

    cuda = device.type == "cuda"
    heads, kv_heads, dim = (4, 2, 16) if smoke else (32, 8, 128)
    if smoke:
        cases = [("decode", [(1, 40)] * 3), ("mixed", [(1, 20), (9, 7), (1, 3)])]
    elif quick:
        cases = [("decode", [(1, 4095)]), ("decode", [(1, 1023)] * 64), ("mixed", [(1, 1023)] * 60 + [(512, 1024)] * 4)]
    else:
        cases = [("decode", [(1, 4095)]), ("decode", [(1, 1023)] * 64), ("decode", [(1, 4095)] * 64),
                 ("decode", [(1, 32767)] * 4), ("mixed", [(1, 1023)] * 60 + [(512, 1024)] * 4)]  # fmt: skip
    rows = []
    gen = torch.Generator(device).manual_seed(seed)
    for kind, specs in cases:
        meta, query, key, value = attention_step(specs, heads, kv_heads, dim, 16, device, gen)
        cache = meta.kv_caches[0]
        scale = dim**-0.5

        def triton_call(meta=meta, query=query, cache=cache, scale=scale) -> torch.Tensor:
            return paged_attention(query, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, 16, scale,
                                   decode_only=meta.decode_only, rows_covered=meta.num_tokens)  # fmt: skip

        def torch_call(meta=meta, query=query, key=key, value=value, cache=cache, scale=scale) -> torch.Tensor:
            return torch_paged_attention(query.transpose(0, 1), key, value, cache, meta, scale)

        triton_call()
        torch_call()
        kv_bytes = sum(n + ctx for n, ctx in specs) * kv_heads * dim * 2 * 2  # K and V read once
        io_bytes = 2 * query.numel() * 2  # queries read, output written
        rows.append(AttnRow(
            kind=kind, seqs=len(specs), context=max(n + c for n, c in specs), query=meta.num_tokens,
            triton_us=1e3 * bench_ms(triton_call, cuda), graph_us=1e3 * graph_ms([triton_call]) if cuda else math.nan,
            torch_us=1e3 * bench_ms(torch_call, cuda), bytes=kv_bytes + io_bytes,
        ))  # fmt: skip
    return rows


def attention_table(rows: list[AttnRow], ceil: dict[str, float] | None) -> str:
    head = (f"{'attn':<6} {'seqs':>4} {'ctx':>6} {'rows':>5} | {'triton':>7} {'graph':>7} {'torch':>8} us | "
            f"{'GB/s':>5} {'%copy':>5} | {'xtorch':>6}")
    lines = ["paged attention (32 q heads, 8 kv heads, d128, bf16, blocks of 16, shuffled)", head, "-" * len(head)]
    copy = ceil["copy_bytes_per_s"] if ceil else math.nan
    for r in rows:
        us = r.graph_us if not math.isnan(r.graph_us) else r.triton_us
        gbs = r.bytes / (us * 1e-6)
        lines.append(
            f"{r.kind:<6} {r.seqs:>4} {r.context:>6} {r.query:>5} | {r.triton_us:>7.1f} {r.graph_us:>7.1f} "
            f"{r.torch_us:>8.1f}    | {gbs / 1e9:>5.0f} {100 * gbs / copy:>5.1f} | {r.torch_us / r.triton_us:>6.1f}"
        )
    lines.append("GB/s, %copy: K and V of every context read once, queries and outputs, over the graph time.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU ok): checks the program runs")
    parser.add_argument("--only", choices=["lora", "sliced", "attention"], help="run one section only")
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
    sections = [args.only] if args.only else ["attention", "sliced", "lora"]
    attn = attention_rows(device, args.smoke, args.seed, args.quick) if "attention" in sections else []
    sliced = sliced_rows(device, args.smoke, args.seed, args.quick) if "sliced" in sections else []
    rows = []
    for i, case in enumerate(grid(args.quick, args.smoke) if "lora" in sections else []):
        rows.append(run_case(case, device, args.seed + i))
        r = rows[-1]
        logger.info("%s T=%d r=%d adapters=%d: triton %.1f us, graph %.1f, fused %.1f, torch %.1f, peft %.1f",
                    r.phase, r.tokens, r.rank, r.adapters, r.triton_us, r.graph_us, r.fused_us, r.torch_us, r.peft_us)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"device": torch.cuda.get_device_name() if cuda else "cpu", "ceilings": ceil,
             "rows": [asdict(r) for r in rows], "sliced": [asdict(r) for r in sliced],
             "attention": [asdict(r) for r in attn]}, indent=1))
    logger.info("total %.0f s", time.time() - started)
    if attn:
        print(attention_table(attn, ceil) + "\n")
    if sliced:
        print(sliced_table(sliced) + "\n")
    if rows:
        print(table(rows, ceil))


if __name__ == "__main__":
    main()
