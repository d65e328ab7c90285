"""GET /metrics: Prometheus text that parses, per-adapter request series labelled only from the
registry (with the arm and an outcome that separates 4xx from 5xx), the engine's adapter-tier
and queue gauges labelled with their device, the process and Python collectors, and no
``*_created`` series."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_utils import adapter_parts, running_server, upload_parts, wait_for
from tests.tiny_models import make_peft_adapter, make_tiny_model

REQUEST_FAMILIES = (
    "peftserve_requests",
    "peftserve_time_to_first_token_seconds",
    "peftserve_time_per_output_token_seconds",
    "peftserve_e2e_request_latency_seconds",
    "peftserve_prompt_tokens",
    "peftserve_generation_tokens",
)
ENGINE_FAMILIES = (
    "peftserve_engine_info",
    "peftserve_adapter_slots_used",
    "peftserve_adapter_slots",
    "peftserve_cpu_cache_hits",
    "peftserve_cpu_cache_misses",
    "peftserve_adapter_load_seconds",
    "peftserve_queue_depth",
    "peftserve_num_requests_running",
    "peftserve_num_requests_waiting",
    "peftserve_adapters",
    "process_cpu_seconds",
    "process_resident_memory_bytes",
    "python_gc_collections",
    "python_info",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), "mistral")


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(model_dir, tmp_path_factory.mktemp("adapters") / "alpha", std=0.3)


@pytest.fixture(scope="module")
def url(model_dir: Path, adapter_dir: Path) -> Iterator[str]:
    with running_server(model_dir, served_model_name="base", max_loras=1) as base_url:
        assert upload_parts(base_url, "alpha", "v1", adapter_parts(adapter_dir)).status_code == 201
        yield base_url


def _scrape(url: str) -> dict:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def _value(families: dict, name: str, sample: str, **labels: str) -> float:
    return sum(
        s.value for s in families[name].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )  # fmt: skip


def _complete(url: str, model: str, **fields) -> httpx.Response:
    body = {"model": model, "prompt": "abc", "max_tokens": 5, "ignore_eos": True, **fields}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_metrics_hold_request_and_engine_series(url: str) -> None:
    assert _complete(url, "alpha").status_code == 200
    assert _complete(url, "alpha@v1").status_code == 200
    assert _complete(url, "base", stream=True).status_code == 200
    assert _complete(url, "alpha", max_tokens=10**6).status_code == 400  # an error after routing
    assert _complete(url, "nobody@x").status_code == 404  # never a label
    assert httpx.post(f"{url}/admin/adapters/alpha/v1/unload", timeout=30).status_code == 200
    assert _complete(url, "alpha").status_code == 200  # back from the CPU cache
    families = _scrape(url)
    for name in REQUEST_FAMILIES + ENGINE_FAMILIES:
        assert name in families, name
    alpha = {"task": "alpha", "version": "v1"}
    requests = "peftserve_requests"
    assert _value(families, requests, f"{requests}_total", outcome="ok", **alpha) == 3
    assert _value(families, requests, f"{requests}_total", outcome="ok", arm="stable", **alpha) == 2
    assert _value(families, requests, f"{requests}_total", outcome="ok", arm="pinned", **alpha) == 1
    assert _value(families, requests, f"{requests}_total", outcome="client_error", **alpha) == 1  # the 400
    assert _value(families, requests, f"{requests}_total", outcome="server_error", **alpha) == 0
    # ... and that 0 is a sample, so a dashboard's error ratio reads 0, not "no data"
    assert any(s.labels["outcome"] == "server_error" and s.labels["task"] == "alpha"
               for s in families[requests].samples)  # fmt: skip
    base = {"task": "base", "version": "base"}
    assert _value(families, "peftserve_requests", "peftserve_requests_total", outcome="ok", **base) == 1
    ttft = "peftserve_time_to_first_token_seconds"
    assert _value(families, ttft, f"{ttft}_count", **alpha) == 3
    tpot = "peftserve_time_per_output_token_seconds"
    assert _value(families, tpot, f"{tpot}_count", **base) == 1
    assert _value(families, "peftserve_generation_tokens", "peftserve_generation_tokens_total", **alpha) == 15
    assert _value(families, "peftserve_prompt_tokens", "peftserve_prompt_tokens_total", **alpha) == 9
    # A CPU server says where its adapter slots are: never a series that reads as GPU slots.
    assert _value(families, "peftserve_adapter_slots", "peftserve_adapter_slots", device="cpu") == 1
    assert _value(families, "peftserve_engine_info", "peftserve_engine_info", device="cpu") == 1
    assert not [name for name in families if "gpu" in name]
    assert {s.labels["tier"] for s in families["peftserve_adapters"].samples} == {"slot", "cpu_cache", "disk"}
    assert _value(families, "peftserve_cpu_cache_hits", "peftserve_cpu_cache_hits_total") >= 1
    load = "peftserve_adapter_load_seconds"
    assert _value(families, load, f"{load}_count") >= 2
    labels = {v for f in families.values() for s in f.samples for v in s.labels.values()}
    assert not labels & {"nobody", "nobody@x", "x"}
    created = [s.name for f in families.values() for s in f.samples if s.name.endswith("_created")]
    assert not created, created


def test_a_client_that_leaves_counts_as_aborted(url: str) -> None:
    body = {"model": "alpha", "prompt": "abc", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))

    def aborted() -> float:
        return _value(_scrape(url), "peftserve_requests", "peftserve_requests_total",
                      outcome="aborted", task="alpha", version="v1")  # fmt: skip

    assert wait_for(lambda: aborted() == 1, timeout=10)


def test_a_deleted_version_loses_its_series(url: str, adapter_dir: Path) -> None:
    assert upload_parts(url, "alpha", "v2", adapter_parts(adapter_dir)).status_code == 201
    assert _complete(url, "alpha@v2").status_code == 200
    assert 'version="v2"' in httpx.get(f"{url}/metrics").text
    assert httpx.delete(f"{url}/admin/adapters/alpha/v2").status_code == 200
    assert 'version="v2"' not in httpx.get(f"{url}/metrics").text


def test_slots_on_a_cuda_engine_are_labelled_cuda() -> None:
    """The device label comes from the engine (no GPU needed: a stand-in engine on "cuda")."""
    import torch
    from prometheus_client import CollectorRegistry, generate_latest

    from peftserve.engine.engine import EngineStats
    from peftserve.server.metrics import EngineCollector

    class CudaEngine:
        engine = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
        stats = EngineStats(gpu_slots_used=3, gpu_slots_total=8, kv_blocks_used=5, kv_blocks_total=64)

        def lora_status(self) -> dict[str, str]:
            return {"a@v1": "gpu", "a@v2": "cpu", "b@v1": "disk", "c@v1": "gpu"}

    registry = CollectorRegistry()
    registry.register(EngineCollector(CudaEngine()))
    text = generate_latest(registry).decode()
    assert 'peftserve_adapter_slots_used{device="cuda"} 3.0' in text
    assert 'peftserve_adapter_slots{device="cuda"} 8.0' in text
    assert 'peftserve_engine_info{device="cuda",dtype="bfloat16"} 1.0' in text
    assert 'peftserve_adapters{tier="slot"} 2.0' in text and 'peftserve_adapters{tier="cpu_cache"} 1.0' in text
