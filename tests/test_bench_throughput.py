"""bench/throughput.py --cpu-smoke: the --gpu program's code paths run (its figures mean nothing on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_bench_code_paths_run_on_cpu(tmp_path):
    out = tmp_path / "figures.json"
    cmd = [sys.executable, "bench/throughput.py", "--cpu-smoke", "--skip-peft", "--skip-transformers",
           "--model-cache", str(tmp_path / "model"), "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["tokens"] == 24 * 8 and figures["a_tok_s"] > 0 and figures["b_tok_s"] > 0
    assert figures["a_over_b"] > 0 and 0 < figures["weight_bw_over_copy"] < 1
    assert (
        figures["host_ms_per_step"] > 0
        and figures["host_steps"] >= 1
        and figures["graphs"] == "off"
    )
    assert "a/b" in proc.stdout and "host ms per decode step" in proc.stdout
