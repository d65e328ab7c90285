#!/usr/bin/env bash
# The GPU check, in one script, for a CUDA machine with the repository copied (not installed):
#   1. pytest -m gpu: the kernel matrix on CUDA and every other gpu-marked test
#   2. bench/kernels.py: Triton LoRA kernels vs torch reference vs PEFT-style loop
#   3. bench/throughput.py --gpu: end-to-end generation throughput
# then a short summary table, printed last. Each step has a time limit so the whole run
# ends within about 8 minutes. Full logs go to $OUT (when set) or ./gpu_check_logs.
#
#   bash scripts/gpu_check.sh     # QUICK=1: the kernel benchmark's --quick grid;
#                                 # THROUGHPUT_LIMIT=S: cap the end-to-end benchmark at S seconds
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
LOGS=${OUT:-$PWD/gpu_check_logs}
mkdir -p "$LOGS"
START=$(date +%s)
SUMMARY=()

note() { printf '[gpu_check %4ds] %s\n' "$(($(date +%s) - START))" "$*" | tee -a "$LOGS/gpu_check.log"; }

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

# step NAME LIMIT_S LOGFILE CMD...: run with a time limit, log everything, record the outcome.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    note "$name: $* (limit ${limit}s)"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOGS/$log"
    local rc=${PIPESTATUS[0]} secs=$(($(date +%s) - t0))
    local what
    case $rc in 0) what=ok ;; 124 | 137) what="TIMEOUT" ;; *) what="FAILED rc=$rc" ;; esac
    SUMMARY+=("$(printf '%-11s %-13s %5ss  %s' "$name" "$what" "$secs" "$(summarize "$name" "$LOGS/$log")")")
}

summarize() {
    case $1 in
        pytest) grep -E '[0-9]+ (passed|failed|error)' "$2" | tail -1 | sed 's/=//g' ;;
        kernels) grep -E '^(decode|prefill) +[0-9]' "$2" | awk -F'|' '{split($5, s, " "); n++;
                     if (s[1] > 0) { lt += log(s[1]); lp += log(s[2]) } }
                     END { if (n) printf "%d cases, geomean speed-up %.1fx vs torch, %.1fx vs peft", n, exp(lt/n), exp(lp/n) }' ;;
        throughput) tail -3 "$2" | tr -s ' ' | tr '\n' ' ' | cut -c1-110 ;;
    esac
}

note "host $(hostname), logs in $LOGS"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    note "no CUDA device visible to $PY (torch.cuda.is_available() is False): nothing to check"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | tee -a "$LOGS/gpu_check.log"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOGS/gpu_check.log"

if make_importable; then
    # Test files holding gpu-marked tests; others are skipped so that missing server-only
    # packages (fastapi, uvicorn, openai) do not stop collection.
    mapfile -t GPU_TESTS < <(grep -l -E 'mark\.gpu|pytest\.mark\.gpu' tests/test_*.py)
    step pytest 240 pytest_gpu.log "$PY" -m pytest -m gpu -q -p no:cacheprovider --durations=10 \
        --continue-on-collection-errors "${GPU_TESTS[@]}"
    KARGS=()
    [[ ${QUICK:-0} == 1 ]] && KARGS+=(--quick)
    step kernels 180 bench_kernels.log "$PY" bench/kernels.py "${KARGS[@]}" --json "$LOGS/bench_kernels.json"
    LEFT=$((470 - ($(date +%s) - START)))
    LIMIT=${THROUGHPUT_LIMIT:-$LEFT}
    ((LEFT > LIMIT)) && LEFT=$LIMIT
    if ((LEFT > 30)); then
        step throughput "$LEFT" bench_throughput.log "$PY" bench/throughput.py --gpu --json "$LOGS/bench_throughput.json"
    else
        SUMMARY+=("$(printf '%-11s %-13s %5ss  %s' throughput SKIPPED 0 "no time left")")
    fi
else
    SUMMARY+=("setup       FAILED           -   peftserve.kernels not importable")
fi

echo
echo "== gpu_check summary ($(($(date +%s) - START)) s; logs in $LOGS) =="
printf '%-11s %-13s %6s  %s\n' step result time detail
for line in "${SUMMARY[@]}"; do echo "$line"; done | tee -a "$LOGS/gpu_check.log"
