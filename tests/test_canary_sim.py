"""The CI-sized run of ``bench/canary_sim.py``: the real controller (its tick interval, probe
rate, windows, judge, store) on a fake clock, a few rollouts per case.

The full table (500 rollouts per case) is in bench/RESULTS.md; here a handful of rollouts per
case checks that nothing regressed grossly: equal versions are never rolled back and are
promoted, clear regressions (latency +50 %, accuracy -10 points, 4x the errors) always are.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROLLOUTS = 6


@pytest.fixture(scope="module")
def sim():
    path = Path(__file__).resolve().parent.parent / "bench" / "canary_sim.py"
    spec = importlib.util.spec_from_file_location("canary_sim", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["canary_sim"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["canary_sim"]


def _run(sim, name: str):
    case = {c.name: c for c in sim.CASES}[name]
    return sim.run_case(case, ROLLOUTS, seed=11, workers=1)


def test_equal_versions_are_promoted_never_rolled_back(sim):
    for name in ("identical-10", "identical-heavy-users"):
        result = _run(sim, name)
        assert result.share("rolled_back") == 0, sim.row(result)
        assert result.share("promoted", within_s=sim.HORIZON_S) >= 5 / 6, sim.row(result)


@pytest.mark.parametrize(
    "name, metric",
    [
        ("latency+50", "latency"),
        ("probes-10pt", "probe_accuracy"),
        ("errors-0.5-to-2pct", "error_rate"),
    ],
)
def test_clear_regressions_are_rolled_back_on_their_metric(sim, name, metric):
    result = _run(sim, name)
    assert result.share("rolled_back") == 1.0, sim.row(result)
    assert {o.metric for o in result.outcomes} == {metric}
