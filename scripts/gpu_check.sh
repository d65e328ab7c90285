#!/usr/bin/env bash
# The GPU check, in one script, for a CUDA machine with the repository copied (not installed).
# It ends within 8 minutes, model build included, and runs a quick pass of everything first,
# so a short lease still yields figures:
#   quick  1. bench/throughput.py --gpu --quick: end-to-end figures on fewer requests/tokens
#             (builds the 1B model and its adapters once, in $LOGS/model, reused below)
#          2. bench/kernels.py --quick: the LoRA (and attention) kernels
#   full   3. pytest -m gpu: the kernel matrices on CUDA, graph-vs-eager equality, every gpu test
#          4. bench/throughput.py --gpu: the issue's end-to-end figures
#          5. bench/kernels.py: the full kernel grid, when time is left
# then one table, printed last, with the GPU's name and every figure. Each step has a time
# limit. Full logs go to $OUT (when set) or ./gpu_check_logs.
#
#   bash scripts/gpu_check.sh           # BUDGET=S: total seconds (default 450)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
LOGS=${OUT:-$PWD/gpu_check_logs}
BUDGET=${BUDGET:-450}
mkdir -p "$LOGS"
START=$(date +%s)
STEPS="$LOGS/steps.tsv"
: >"$STEPS"

note() { printf '[gpu_check %4ds] %s\n' "$(($(date +%s) - START))" "$*" | tee -a "$LOGS/gpu_check.log"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# Make `peftserve` and `peftserve.kernels` (the top-level kernels/ dir, mapped by
# pyproject's package-dir) importable without network: an editable install with the
# machine's own setuptools, else a meta-path finder loaded from a .pth file.
make_importable() {
    if "$PY" -c "import peftserve.kernels" 2>/dev/null; then return 0; fi
    "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . >"$LOGS/install.log" 2>&1
    if "$PY" -c "import peftserve.kernels" 2>/dev/null; then note "installed editable (pip -e)"; return 0; fi
    local shim site
    shim=$(mktemp -d)
    site=$("$PY" -c "import site, sys; print((site.getsitepackages() or [site.getusersitepackages()])[0])")
    cat >"$shim/_peftserve_dev.py" <<EOF
import importlib.machinery, importlib.util, sys
_REPO = "$PWD"
sys.path.insert(0, _REPO)
class _KernelsFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "peftserve.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, _REPO + "/kernels/__init__.py", submodule_search_locations=[_REPO + "/kernels"])
sys.meta_path.insert(0, _KernelsFinder)
EOF
    mkdir -p "$site"
    echo "import sys; sys.path.insert(0, '$shim'); import _peftserve_dev" >"$site/_peftserve_dev.pth"
    if "$PY" -c "import peftserve.kernels" 2>>"$LOGS/install.log"; then
        note "pip -e failed (see install.log); using the .pth finder in $site"
        return 0
    fi
    note "cannot make peftserve.kernels importable (see $LOGS/install.log)"
    return 1
}

# step NAME LIMIT_S LOGFILE CMD...: run with a time limit (capped by the budget left), log
# everything, record the outcome in steps.tsv.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local budget_left
    budget_left=$(($(left) - 15))  # keep time for the summary
    ((limit > budget_left)) && limit=$budget_left
    if ((limit < 20)); then
        note "$name: skipped, no time left"
        printf '%s\t%s\t%s\t%s\n' "$name" "SKIPPED" 0 "$log" >>"$STEPS"
        return
    fi
    note "$name: $* (limit ${limit}s)"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$LOGS/$log" 2>&1
    local rc=$? secs=$(($(date +%s) - t0))
    tail -15 "$LOGS/$log"
    local what
    case $rc in 0) what=ok ;; 124 | 137) what="TIMEOUT" ;; *) what="FAILED rc=$rc" ;; esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$what" "$secs" "$log" >>"$STEPS"
}

note "host $(hostname), logs in $LOGS, budget ${BUDGET}s"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    note "no CUDA device visible to $PY (torch.cuda.is_available() is False): nothing to check"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | tee "$LOGS/gpu.txt"
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOGS/gpu.txt"

if make_importable; then
    TP=(bench/throughput.py --gpu --model-cache "$LOGS/model")
    step throughput-quick 170 throughput_quick.log "$PY" "${TP[@]}" --quick --json "$LOGS/throughput_quick.json"
    step kernels-quick 75 kernels_quick.log "$PY" bench/kernels.py --quick --json "$LOGS/kernels_quick.json"
    # Test files holding gpu-marked tests; others are skipped so that missing server-only
    # packages (fastapi, uvicorn, openai) do not stop collection.
    mapfile -t GPU_TESTS < <(grep -l -E 'mark\.gpu|pytest\.mark\.gpu' tests/test_*.py)
    step pytest 150 pytest_gpu.log "$PY" -m pytest -m gpu -q -p no:cacheprovider --durations=10 \
        --continue-on-collection-errors "${GPU_TESTS[@]}"
    step throughput 170 throughput.log "$PY" "${TP[@]}" --json "$LOGS/throughput.json"
    step kernels 150 kernels.log "$PY" bench/kernels.py --json "$LOGS/kernels.json"
else
    printf '%s\t%s\t%s\t%s\n' setup "FAILED" 0 install.log >>"$STEPS"
fi

echo
note "summary"
"$PY" - "$LOGS" "$(($(date +%s) - START))" <<'EOF' | tee -a "$LOGS/gpu_check.log"
"""One table: every step's outcome, then the figures of the fullest run of each benchmark."""
import json, math, re, sys
from pathlib import Path

logs, elapsed = Path(sys.argv[1]), sys.argv[2]
gpu = (logs / "gpu.txt").read_text().splitlines()[0] if (logs / "gpu.txt").exists() else "?"
print(f"== gpu_check: {gpu} ({elapsed} s; logs in {logs}) ==")
rows = []
for line in (logs / "steps.tsv").read_text().splitlines():
    name, result, secs, log = line.split("\t")
    detail = ""
    text = (logs / log).read_text(errors="replace") if (logs / log).exists() else ""
    if name == "pytest":
        found = re.findall(r"\d+ (?:passed|failed|error|skipped)[^\n=]*", text)
        detail = found[-1] if found else ""
    rows.append((name, result, f"{secs}s", detail))

def load(*names):
    for n in names:
        p = logs / n
        if p.exists():
            return n, json.loads(p.read_text())
    return None, None

src, tp = load("throughput.json", "throughput_quick.json")
if tp:
    def f(key, fmt, scale=1.0):
        v = tp.get(key)
        return format(v * scale, fmt) if isinstance(v, (int, float)) else "n/a"
    tag = "" if src == "throughput.json" else " (quick)"
    rows += [
        (f"e2e tok/s{tag}", f"a {f('a_tok_s', '.0f')}  b {f('b_tok_s', '.0f')}", f"c {f('c_tok_s', '.0f')}",
         f"d {f('d_tok_s', '.0f')} {tp.get('d_error', '')}"),
        ("a/b", f("a_over_b", ".2f"), ">= 0.90", ""),
        ("a/c", f("a_over_c", ".1f"), ">= 10", ""),
        ("b/d", f("b_over_d", ".2f"), ">= 1.5", ""),
        ("batch-1 bw/copy", f("weight_bw_over_copy", ".1%"), ">= 60%",
         f"{f('weight_bytes_per_s', '.0f', 1e-9)} of {f('copy_bytes_per_s', '.0f', 1e-9)} GB/s"),
        (f"host ms/step b{tp.get('host_batch')}", f("host_ms_per_step", ".3f"), "< 1", f"graphs {tp.get('graphs')}"),
    ]
src, kr = load("kernels.json", "kernels_quick.json")
if kr:
    ceil = (kr.get("ceilings") or {}).get("copy_bytes_per_s")
    def best_us(r):  # the faster of the graph-replayed two launches and the fused kernel
        times = [t for t in (r.get("graph_us"), r.get("fused_us")) if isinstance(t, (int, float)) and t > 0]
        return min(times) if times else None
    for r in kr.get("rows", []):
        if r.get("phase") == "decode" and r.get("rank") == 16 and r.get("tokens") == 64 and r.get("adapters") == 32:
            us = best_us(r)
            pct = 100 * r["bytes"] / (us * 1e-6) / ceil if ceil and us else math.nan
            rows.append(("lora T64 n32 r16", f"{pct:.1f}% copy", ">= 50%", f"x{r['torch_us'] / us:.1f} torch (>= 3)" if us else ""))
    speedups = [r["torch_us"] / best_us(r) for r in kr.get("rows", []) if best_us(r)]
    if speedups:
        geo = math.exp(sum(map(math.log, speedups)) / len(speedups))
        rows.append((f"lora kernels{'' if src == 'kernels.json' else ' (quick)'}", f"{len(speedups)} cases", "", f"geomean x{geo:.1f} vs torch"))
for name, a, b, c in rows:
    print(f"{name:<20} {a:<24} {b:<10} {c}")
EOF
