"""bench/ray_scaling.py without Ray: its workload is built with the throughput bench's helpers
and its settings are a valid ``peftserve serve --ray`` application (the program itself runs
Ray Serve: ``python bench/ray_scaling.py --smoke``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="peftserve[ray] is installed with the dev requirements")

REPO = Path(__file__).resolve().parent.parent


def _bench():
    saved = list(sys.path)  # the program puts bench/ first on the path; keep the suite's own
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_ray_scaling", REPO / "bench" / "ray_scaling.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_the_scaling_bench_builds_its_workload_and_a_valid_application(tmp_path):
    from ray.serve import Application

    from peftserve.server.ray_app import application

    bench = _bench()
    work = bench.prepare(tmp_path, seed=0, smoke=True)
    assert len(work.adapters) == 4 and len(work.requests) == 8 and len(work.warm) == 4
    assert all((a / "adapter_model.safetensors").is_file() for a in work.adapters)
    assert {r["model"] for r in work.requests} <= {w["model"] for w in work.warm}
    assert all(1 <= r["max_tokens"] <= 8 and r["ignore_eos"] for r in work.requests)
    settings = bench.settings_for(work.base, work.adapters, str(tmp_path / "data"), 2, 64, 1, 0.125)
    assert (settings.ray.engine_replicas, settings.ray.engine_num_cpus) == (2, 1)
    assert len(settings.server.adapter) == 4
    assert isinstance(application(settings), Application)  # nothing starts without serve.run
