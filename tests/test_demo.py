"""End to end on the real server with the bundled demo model: ``peftserve demo``.

The good reverse v2 must be promoted and the regressed one rolled back without any manual
step, each decision naming its metric, and no user outside the canary cohort may get a
candidate's answer (the demo checks every candidate response against the router's buckets).

It runs as a user runs it after README command 1 alone: from the repository root (so the root
is on ``sys.path``, for the demo and for the server it starts with ``python -m``), in an
environment holding only what requirements.txt installs (``runtime_python``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_promotes_good_and_rolls_back_regressed(runtime_python: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PEFTSERVE_", "TRITON_")) and k != "PYTHONPATH"
    }
    done = subprocess.run([str(runtime_python), "-m", "peftserve.cli", "demo", "--timeout", "150"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    text = done.stdout
    assert done.returncode == 0, f"{text}\n--- stderr\n{done.stderr[-3000:]}"
    assert "=> reverse@v2: promoted (as expected)" in text
    assert "=> reverse@v2-regressed: rolled_back (as expected)" in text
    assert "critical metric(s) probe_accuracy failed" in text  # the history names the metric
    assert "0 of them outside the 10 % cohort" in text
    assert (
        "watch it in a browser: http://127.0.0.1:" in text and "/ui " in text
    )  # the page's address
