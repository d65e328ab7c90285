"""LoRA kernels against an fp64 torch reference, as a matrix.

Single projections (shrink then expand), and sliced groups (q/k/v, gate/up: one launch for
all slices, a slice of rank 0 where an adapter does not target it) through both the
two-launch pair and the fused single launch; the Triton backend against the torch backend.

dtype x hidden size x adapter popularity x token count, with slot-0 segments, empty
segments, rank-1 next to rank-128 adapters, segments out of order, strided views, and
poison everywhere the kernels must not read or write: NaN in the adapter rows past each
slot's rank, in slot 0 and in empty slots; NaN in the shrink output (unwritten entries stay
NaN, and the expand reads that same buffer, so any stray read turns its output NaN); a
random base output whose non-adapter rows and out-of-view columns must stay bit-identical.

Without CUDA the kernels run in Triton's interpreter on small shapes: ``TRITON_INTERPRET``
must be set before triton is first imported (``tests/conftest.py`` sets it; it is set here
too for runs outside this test tree). ``-m gpu`` runs the large matrix (hidden 4096, up to
8192 tokens) on CUDA.
"""

from __future__ import annotations

import math
import os
import random
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On CUDA the matrix runs each shape bucket's first-choice config (one compile per bucket,
# not one per candidate); test_every_tuned_config checks every candidate on its own.
os.environ.setdefault("PEFTSERVE_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from peftserve import kernels  # noqa: E402
from peftserve.lora.backend import TorchBackend, select_backend  # noqa: E402
from peftserve.lora.layers import LoRAStack  # noqa: E402
from peftserve.lora.metadata import LoRAStepMetadata  # noqa: E402
from peftserve.lora.triton_backend import TritonBackend  # noqa: E402

# The package exports functions named like their modules, so reach the modules this way.
shrink_mod = sys.modules["peftserve.kernels.lora_shrink"]
expand_mod = sys.modules["peftserve.kernels.lora_expand"]
SMEM_BUDGET = sys.modules["peftserve.kernels._segments"].SMEM_BUDGET
if not CUDA and not isinstance(shrink_mod._shrink_kernel.fn, InterpretedFunction):
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)")

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
POPULARITY = ["distinct", "uniform", "zipf", "identical", "skewed"]
# Slot 0 is "no adapter"; slot 6 is an empty slot (rank 0). Ranks 1 and 128 share every
# batch that has more than one adapter.
SLOT_RANKS = [0, 1, 128, 12, 48, 16, 0, 7]
R_MAX = 128
ADAPTER_SLOTS = [1, 2, 3, 4, 5, 7]
# Error per row against fp64, relative to the row's sum of absolute terms (row_errors):
# shrink accumulates exact products in fp32; expand also rounds to the output dtype once.
SHRINK_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
EXPAND_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

SPLITS = [1, 3, 8]
CPU_HIDDEN = [33, 130, 257]
CPU_TOKENS = [1, 3, 7, 133]
GPU_HIDDEN = [33, 257, 2049, 4096]
GPU_TOKENS = [1, 3, 7, 133, 1024, 8192]


def token_slots(popularity: str, num_tokens: int, rng: random.Random) -> list[int]:
    """Slot of every packed token; slot 0 (no adapter) mixed in except for ``identical``."""
    adapters = ADAPTER_SLOTS[:]
    rng.shuffle(adapters)
    if popularity == "identical":
        return [adapters[0]] * num_tokens
    if popularity == "distinct":  # one segment per adapter, as even as the count allows
        parts = min(num_tokens, len(adapters))
        return [adapters[i * parts // num_tokens] for i in range(num_tokens)]
    choices = adapters + [0]
    if popularity == "uniform":
        weights = [1.0] * len(choices)
    elif popularity == "zipf":
        weights = [1.0 / (k + 1) ** 1.2 for k in range(len(choices))]
    else:  # skewed: one adapter takes 90%
        weights = [0.9] + [0.1 / (len(choices) - 1)] * (len(choices) - 1)
    slots = rng.choices(choices, weights=weights, k=num_tokens)
    if popularity == "uniform" and num_tokens <= 256:
        return slots  # left unsorted: many short segments, slots repeated across segments
    return sorted(slots)


def segments_of(slots: list[int], rng: random.Random) -> list[tuple[int, int, int]]:
    """Runs of one slot, plus empty segments, in shuffled buffer order."""
    segs = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            segs.append((start, i - start, slots[start]))
            start = i
    segs += [(rng.randrange(len(slots) + 1), 0, rng.choice(ADAPTER_SLOTS)) for _ in range(2)]
    rng.shuffle(segs)
    return segs


def segment_buffers(segs: list[tuple[int, int, int]], pad: int = 3) -> list[torch.Tensor]:
    """seg_start, seg_len, seg_slot as the metadata holds them: zero entries past the live ones."""
    table = torch.zeros(3, len(segs) + pad, dtype=torch.int32)
    table[:, : len(segs)] = torch.tensor(segs, dtype=torch.int32).T
    return [row.contiguous().to(DEVICE) for row in table]


def adapter_weights(k: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A [S, R, k] and B [S, n, R] with y and the delta ~ N(0, 1); NaN wherever nobody may read."""
    s = len(SLOT_RANKS)
    a = torch.randn(s, R_MAX, k, device=DEVICE, dtype=torch.float64) / math.sqrt(k)
    b = torch.randn(s, n, R_MAX, device=DEVICE, dtype=torch.float64)
    for slot, r in enumerate(SLOT_RANKS):
        a[slot, r:] = math.nan
        b[slot, :, r:] = math.nan
        if r:
            b[slot] /= math.sqrt(r)
    return a.to(dtype), b.to(dtype)


def strided(rows: int, cols: int, dtype: torch.dtype, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random [rows, cols] view into a [rows, cols + pad] buffer, and the buffer."""
    full = torch.randn(rows, cols + pad, device=DEVICE, dtype=torch.float64).to(dtype)
    return full[:, :cols], full


def row_errors(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Error of each row relative to ``scale``, the row's sum of absolute terms (the size that
    rounding errors are proportional to: cancellation can make ``ref`` itself near zero).
    NaN anywhere in a row makes it NaN, which fails every ``<`` check."""
    return (got.double() - ref).norm(dim=1) / scale.norm(dim=1).clamp_min(1e-30)


def check_case(dtype: torch.dtype, k: int, n: int, popularity: str, num_tokens: int, seed: int,
               split: int = 1, config: dict | None = None) -> None:
    """Run shrink then expand on one random case and check every row.

    ``split`` > 1 makes the intermediate [split, T, R]: split-K partial sums."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    segs = segments_of(token_slots(popularity, num_tokens, rng), rng)
    seg_start, seg_len, seg_slot = segment_buffers(segs)
    ranks = torch.tensor(SLOT_RANKS, dtype=torch.int32, device=DEVICE)
    pad = 5 if max(k, n) < 1024 else 0
    x, _ = strided(num_tokens, k, dtype, pad)  # [T, k]
    lora_a, lora_b = adapter_weights(k, n, dtype)
    out, out_full = strided(num_tokens, n, dtype, pad)  # [T, n]
    base = out_full.clone()
    shape = (split, num_tokens, R_MAX) if split > 1 else (num_tokens, R_MAX)
    y = torch.full(shape, math.nan, device=DEVICE)  # [(split,) T, R] poisoned

    cfg = config or {}
    kernels.lora_shrink(x, lora_a, ranks, seg_start, seg_len, seg_slot, y, config=cfg.get("shrink"))
    y_after_shrink = y.clone().view(split, num_tokens, R_MAX)  # [split, T, R]
    y_sum = y_after_shrink.sum(0)  # [T, R]
    kernels.lora_expand(y, lora_b, ranks, seg_start, seg_len, seg_slot, out, config=cfg.get("expand"))

    touched = torch.zeros(num_tokens, dtype=torch.bool, device=DEVICE)
    for start, length, slot in segs:
        r = SLOT_RANKS[slot]
        if slot == 0 or r == 0 or length == 0:
            continue
        rows = slice(start, start + length)
        touched[rows] = True
        xs, a_r, b_r = x[rows].double(), lora_a[slot, :r].double(), lora_b[slot, :, :r].double()
        y_ref = xs @ a_r.T  # [len, r]
        y_abs = xs.abs() @ a_r.abs().T  # [len, r]
        out_ref = base[rows, :n].double() + y_ref @ b_r.T  # [len, n]
        out_abs = base[rows, :n].double().abs() + y_abs @ b_r.abs().T  # [len, n]
        shrink_err = row_errors(y_sum[rows, :r], y_ref, y_abs).max().item()
        assert shrink_err < SHRINK_TOL[dtype], f"shrink rows {rows} slot {slot}: {shrink_err:.2e}"
        assert y_after_shrink[:, rows, r:].isnan().all(), f"shrink wrote past rank {r} (slot {slot})"
        expand_err = row_errors(out[rows], out_ref, out_abs).max().item()
        assert expand_err < EXPAND_TOL[dtype], f"expand rows {rows} slot {slot}: {expand_err:.2e}"
    assert y_after_shrink[:, ~touched].isnan().all(), "shrink wrote rows outside adapter segments"
    assert torch.equal(out_full[~touched], base[~touched]), "expand touched non-adapter rows"
    assert torch.equal(out_full[:, n:], base[:, n:]), "expand wrote outside the output view"


def matrix(hidden: list[int], tokens: list[int]) -> list[tuple]:
    """dtype x popularity x tokens, each hidden size and split-K meeting every dtype and
    popularity (split 3 is not one the backend uses: it checks uneven slices of K)."""
    cases = []
    for i, (dtype, pop, t) in enumerate(
        (d, p, t) for d in DTYPES for p in POPULARITY for t in tokens
    ):
        k = hidden[i % len(hidden)]
        n = hidden[(i // len(hidden) + i + 1) % len(hidden)]
        split = SPLITS[(i // 2) % len(SPLITS)]
        cases.append(pytest.param(dtype, k, n, pop, t, split,
                                  id=f"{str(dtype)[6:]}-{pop}-T{t}-k{k}-n{n}-s{split}"))
    return cases


@pytest.mark.parametrize(("dtype", "k", "n", "popularity", "num_tokens", "split"),
                         matrix(CPU_HIDDEN, CPU_TOKENS))
def test_kernels_small(dtype, k, n, popularity, num_tokens, split, seed):
    check_case(dtype, k, n, popularity, num_tokens, seed=seed, split=split)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("dtype", "k", "n", "popularity", "num_tokens", "split"),
                         matrix(GPU_HIDDEN, GPU_TOKENS))
def test_kernels_gpu(dtype, k, n, popularity, num_tokens, split, seed):
    check_case(dtype, k, n, popularity, num_tokens, seed=seed, split=split)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["shrink", "expand"])
def test_every_tuned_config(which, dtype, seed):
    """Each autotune candidate that fits shared memory is correct, not only the winner."""
    mod = shrink_mod if which == "shrink" else expand_mod
    elem = torch.empty(0, dtype=dtype).element_size()
    block_r = 128 if which == "shrink" else 32  # R_MAX = 128
    checked = 0
    for config in mod.TUNE_CONFIGS:
        if mod.smem_bytes(config, elem, block_r) > SMEM_BUDGET:
            continue  # the pruner never runs it for these shapes
        t = {16: 133, 32: 300, 64: 1024, 128: 2048}[config.kwargs["BLOCK_M"]]
        check_case(dtype, 257, 2049, "uniform", t, seed=seed + checked, split=2,
                   config={which: config})
        checked += 1
    assert checked


def _stack(d_in: int, slices: tuple[int, ...], num_slots: int, r_max: int, dtype: torch.dtype) -> LoRAStack:
    return LoRAStack(d_in, slices, num_slots, r_max, dtype, DEVICE)


def _publish(stack: LoRAStack) -> None:
    """What LoRAManager does after a load: the device ranks follow the host ranks."""
    stack.slot_ranks.copy_(torch.tensor(stack.ranks, dtype=torch.int32).T)


@pytest.mark.parametrize("fused", [0, 128], ids=["two-launches", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_triton_backend_matches_torch_backend(dtype, fused, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_slots, r_max, d_in, slices = 6, 16, 48, (40, 24, 24)
    stack = _stack(d_in, slices, num_slots, r_max, dtype)
    ranks = [(0, 0, 0), (4, 4, 0), (16, 16, 16), (1, 0, 3), (0, 0, 0), (12, 2, 7)]  # per slot, per slice
    for slot, rs in enumerate(ranks):
        for i, r in enumerate(rs):
            if slot and r:
                a = torch.randn(r, d_in, device=DEVICE).to(dtype)
                stack.set_slot(slot, i, a, torch.randn(slices[i], r, device=DEVICE).to(dtype))
    _publish(stack)
    meta = LoRAStepMetadata(max_tokens=64, max_segments=8, device=DEVICE)  # tokens sorted: <= 6 segments
    triton_backend, torch_backend = TritonBackend(fused_max_tokens=fused), TorchBackend()
    assert isinstance(select_backend("triton", DEVICE), TritonBackend)
    for step in range(2):
        if step == 1:  # an adapter loads into slot 4: the device ranks must follow
            stack.set_slot(4, 1, torch.randn(8, d_in, device=DEVICE).to(dtype),
                           torch.randn(slices[1], 8, device=DEVICE).to(dtype))  # fmt: skip
            _publish(stack)
        num_tokens = rng.randint(1, 40)
        meta.prepare(sorted(rng.randrange(num_slots) for _ in range(num_tokens)))
        x = torch.randn(num_tokens, d_in, device=DEVICE).to(dtype)
        base = torch.randn(num_tokens, sum(slices), device=DEVICE).to(dtype)
        got, want = base.clone(), base.clone()
        triton_backend.add_lora(x, got, stack, meta)
        torch_backend.add_lora(x, want, stack, meta)
        err = row_errors(got, want.double(), want.double().abs() + 1).max().item()
        assert err < EXPAND_TOL[dtype], f"seed {seed} step {step}: {err:.2e}"
        for start, length, slot in meta.host_segments:
            if slot == 0 or max(stack.ranks[i][slot] for i in range(3)) == 0:
                assert torch.equal(got[start : start + length], base[start : start + length])
    assert len(triton_backend._intermediates) == (0 if fused else 1), "the fp32 intermediate is allocated once"


def test_triton_backend_skips_steps_without_adapters():
    meta = LoRAStepMetadata(max_tokens=8, max_segments=4, device=DEVICE)
    meta.prepare([0, 0, 0])
    out = torch.randn(3, 8, device=DEVICE)
    before = out.clone()
    stack = _stack(8, (8,), 2, 4, torch.float32)
    stack.set_slot(1, 0, torch.randn(4, 8, device=DEVICE), torch.randn(8, 4, device=DEVICE))
    _publish(stack)
    TritonBackend().add_lora(torch.randn(3, 8, device=DEVICE), out, stack, meta)
    assert torch.equal(out, before)


def test_launchers_reject_bad_inputs():
    x = torch.randn(4, 16, device=DEVICE)
    a = torch.randn(2, 16, 16, device=DEVICE)
    ranks = torch.tensor([0, 16], dtype=torch.int32, device=DEVICE)
    seg = [torch.zeros(2, dtype=torch.int32, device=DEVICE) for _ in range(3)]
    y = torch.empty(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="fp32"):
        kernels.lora_shrink(x, a, ranks, *seg, y.half())
    with pytest.raises(ValueError, match="cast the adapter"):
        kernels.lora_shrink(x, a.half(), ranks, *seg, y)
    with pytest.raises(ValueError, match="int32"):
        kernels.lora_shrink(x, a, ranks.long(), *seg, y)
    with pytest.raises(ValueError, match="output features"):
        kernels.lora_expand(y, torch.randn(2, 8, 16, device=DEVICE), ranks, *seg, x)
    with pytest.raises(ValueError, match="slices"):
        kernels.lora_expand(y, torch.randn(2, 16, 16, device=DEVICE), ranks, *seg, x, slices=(8, 7))
    with pytest.raises(ValueError, match="rank 256 > 128"):
        kernels.lora_shrink_expand(x, torch.randn(2, 256, 16, device=DEVICE), torch.randn(2, 16, 256, device=DEVICE),
                                   ranks, *seg, x)  # fmt: skip


# ---- slices (q/k/v, gate/up) and the fused decode launch --------------------------------------

# Per slot, the rank of each of three slices: 0 where the adapter does not target that slice
# (slot 0 and the empty slot 6 are all 0); ranks 1 and 128 share every multi-adapter batch.
SLICE_RANKS = [(0, 0, 0), (1, 0, 7), (128, 128, 128), (12, 12, 0), (48, 16, 32), (16, 16, 16), (0, 0, 0),
               (7, 3, 1)]  # fmt: skip
SLICE_SHAPES = [(33,), (40, 17), (64, 16, 16), (130, 33, 33)]


def sliced_weights(k: int, slices: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A [S, NS, R, k] and B [S, N, R]; NaN past every (slot, slice) rank."""
    num_slots, ns = len(SLICE_RANKS), len(slices)
    a = torch.randn(num_slots, ns, R_MAX, k, device=DEVICE, dtype=torch.float64) / math.sqrt(k)
    b = torch.randn(num_slots, sum(slices), R_MAX, device=DEVICE, dtype=torch.float64)
    offsets = [sum(slices[:i]) for i in range(ns + 1)]
    for slot, ranks in enumerate(SLICE_RANKS):
        for i, r in enumerate(ranks[:ns]):
            a[slot, i, r:] = math.nan
            b[slot, offsets[i] : offsets[i + 1], r:] = math.nan
            if r:
                b[slot, offsets[i] : offsets[i + 1]] /= math.sqrt(r)
    return a.to(dtype), b.to(dtype)


def check_sliced_case(dtype: torch.dtype, k: int, slices: tuple[int, ...], popularity: str, num_tokens: int,
                      seed: int, split: int = 1) -> None:
    """Sliced shrink+expand and the fused launch on one random case, every row against fp64."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    ns, n = len(slices), sum(slices)
    segs = segments_of(token_slots(popularity, num_tokens, rng), rng)
    seg_start, seg_len, seg_slot = segment_buffers(segs)
    ranks = torch.tensor([r[:ns] for r in SLICE_RANKS], dtype=torch.int32, device=DEVICE)  # [S, NS]
    x, _ = strided(num_tokens, k, dtype, 5)  # [T, k]
    lora_a, lora_b = sliced_weights(k, slices, dtype)
    out_two, out_full = strided(num_tokens, n, dtype, 5)  # [T, n]
    base = out_full.clone()
    y = torch.full((ns, split, num_tokens, R_MAX), math.nan, device=DEVICE)  # poisoned
    kernels.lora_shrink(x, lora_a, ranks, seg_start, seg_len, seg_slot, y)
    kernels.lora_expand(y, lora_b, ranks, seg_start, seg_len, seg_slot, out_two, slices=slices)
    fused_full = base.clone()
    out_fused = fused_full[:, :n]
    kernels.lora_shrink_expand(x, lora_a, lora_b, ranks, seg_start, seg_len, seg_slot, out_fused, slices=slices)

    offsets = [sum(slices[:i]) for i in range(ns + 1)]
    touched = torch.zeros(num_tokens, n, dtype=torch.bool, device=DEVICE)
    for start, length, slot in segs:
        rows = slice(start, start + length)
        for i, r in enumerate(SLICE_RANKS[slot][:ns]):
            if slot == 0 or r == 0 or length == 0:
                continue
            cols = slice(offsets[i], offsets[i + 1])
            touched[rows, cols] = True
            xs, a_r, b_r = x[rows].double(), lora_a[slot, i, :r].double(), lora_b[slot, cols, :r].double()
            out_ref = base[rows, cols].double() + (xs @ a_r.T) @ b_r.T  # [len, n_i]
            out_abs = base[rows, cols].double().abs() + (xs.abs() @ a_r.abs().T) @ b_r.abs().T
            for name, out in (("two launches", out_two), ("fused", out_fused)):
                err = row_errors(out[rows, cols], out_ref, out_abs).max().item()
                assert err < EXPAND_TOL[dtype], f"seed {seed}: {name} rows {rows} slot {slot} slice {i}: {err:.2e}"
    for name, full in (("two launches", out_full), ("fused", fused_full)):
        assert torch.equal(full[:, :n][~touched], base[:, :n][~touched]), f"seed {seed}: {name} wrote outside"
        assert torch.equal(full[:, n:], base[:, n:]), f"seed {seed}: {name} wrote outside the output view"


def sliced_matrix(hidden: list[int], tokens: list[int], shapes: list[tuple[int, ...]], per_pair: int) -> list:
    """dtype x popularity, each pair with ``per_pair`` token counts, hidden sizes, slice shapes
    and splits cycling through their lists."""
    cases = []
    pairs = [(d, p) for d in DTYPES for p in POPULARITY]
    for i, (dtype, pop) in enumerate(pair for pair in pairs for _ in range(per_pair)):
        t, k = tokens[i % len(tokens)], hidden[(i // 2) % len(hidden)]
        sl, split = shapes[(i // 3) % len(shapes)], SPLITS[i % len(SPLITS)]
        cases.append(pytest.param(dtype, k, sl, pop, t, split,
                                  id=f"{str(dtype)[6:]}-{pop}-T{t}-k{k}-slices{'x'.join(map(str, sl))}-s{split}"))
    return cases


@pytest.mark.parametrize(("dtype", "k", "slices", "popularity", "num_tokens", "split"),
                         sliced_matrix(CPU_HIDDEN, [1, 7, 12, 3], SLICE_SHAPES, 1))  # fmt: skip
def test_sliced_and_fused_small(dtype, k, slices, popularity, num_tokens, split, seed):
    check_sliced_case(dtype, k, slices, popularity, num_tokens, seed=seed, split=split)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("dtype", "k", "slices", "popularity", "num_tokens", "split"),
                         sliced_matrix(GPU_HIDDEN, [1, 3, 7, 64, 133, 1024],
                                       [(4096,), (4096, 1024, 1024), (14336, 14336), (2049, 257, 257)], 2))  # fmt: skip
def test_sliced_and_fused_gpu(dtype, k, slices, popularity, num_tokens, split, seed):
    check_sliced_case(dtype, k, slices, popularity, num_tokens, seed=seed, split=split)
