"""/metrics speaks vLLM's names as the Gateway API Inference Extension's model-server protocol
defines them, so a peftserve pod can sit in an InferencePool.

The definitions checked here are those of the protocol document
(kubernetes-sigs/gateway-api-inference-extension, docs/proposals/003-model-server-protocol/
README.md, commit 84436a96): TotalQueuedRequests = gauge ``vllm:num_requests_waiting``,
TotalRunningRequests = gauge ``vllm:num_requests_running``, KVCacheUtilization = gauge
``vllm:kv_cache_usage_perc`` (the endpoint picker's vLLM client of early 2025 reads
``vllm:gpu_cache_usage_perc``, exported on CUDA engines; both are a fraction, as vLLM reports
it), optional BlockSize and
NumGPUBlocks as labels ``block_size`` and ``num_gpu_blocks`` of ``vllm:cache_config_info``; and
for LoRA a gauge ``vllm:lora_requests_info`` whose value is the time it was updated and whose
labels are ``max_lora`` (an integer: adapters that fit in GPU memory at once),
``running_lora_adapters`` and ``waiting_lora_adapters`` (comma-separated adapter names, the names
requests give as ``model``). The endpoint picker splits those lists on "," without trimming, so
they hold no spaces.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from peftserve.cli import build_parser, serve_settings
from peftserve.engine.engine import EngineStats
from peftserve.server.metrics import VLLMCollector
from peftserve.server.model_table import ModelTable
from tests.server_utils import running_server
from tests.tiny_models import make_peft_adapter, make_tiny_model

MAX_LORAS = 2
PROTOCOL_GAUGES = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
)
LORA_LABELS = {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), "qwen2")


@pytest.fixture(scope="module")
def url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("adapters")
    adapters = {
        "alpha": make_peft_adapter(model_dir, root / "alpha", seed=1, std=0.3),
        "beta": make_peft_adapter(model_dir, root / "beta", seed=2, std=0.3),
    }
    # Started with vLLM's flag names: --lora-modules (both forms), --max-loras, --max-lora-rank,
    # --max-cpu-loras.
    modules = [
        f"alpha={adapters['alpha']}",
        json.dumps({"name": "beta", "path": str(adapters["beta"])}),
    ]
    flags = {
        "max_loras": MAX_LORAS,
        "max_lora_rank": 8,
        "max_cpu_loras": 4,
        "lora_modules": modules,
    }
    with running_server(model_dir, served_model_name="base", block_size=8, **flags) as base_url:
        yield base_url


def scrape(url: str) -> dict[str, object]:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def lora_info(families: dict) -> dict[str, str]:
    family = families["vllm:lora_requests_info"]
    assert family.type == "gauge"
    [sample] = family.samples
    assert set(sample.labels) >= LORA_LABELS
    assert abs(sample.value - time.time()) < 60, "the value is the Unix time of the update"
    return sample.labels


def test_protocol_gauges_and_lora_info_have_the_protocol_shapes(url: str) -> None:
    families = scrape(url)
    for name in PROTOCOL_GAUGES:
        family = families[name]
        assert family.type == "gauge", name
        [sample] = family.samples
        assert sample.value >= 0
    assert 0.0 <= families["vllm:kv_cache_usage_perc"].samples[0].value <= 1.0
    assert "vllm:gpu_cache_usage_perc" not in families  # a CPU server names no series gpu
    [config] = families["vllm:cache_config_info"].samples
    assert config.labels["block_size"] == "8" and int(config.labels["num_gpu_blocks"]) > 0
    labels = lora_info(families)
    assert int(labels["max_lora"]) == MAX_LORAS
    assert labels["waiting_lora_adapters"] == ""


def test_running_adapters_are_the_model_names_of_resident_adapters(url: str) -> None:
    body = {"model": "alpha", "prompt": "abc", "max_tokens": 2}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200
    version = response.headers["x-peftserve-version"]  # alpha@<sha[:12]>
    models = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
    running = lora_info(scrape(url))["running_lora_adapters"]
    assert " " not in running
    names = running.split(",")
    assert {"alpha", version} <= set(names)  # a request for either lands on this pod warm
    assert set(names) <= models
    assert not any(name.startswith("beta") for name in names), "beta never loaded"


class _Engine:
    """A stand-in engine: one adapter resident, requests waiting for two others."""

    engine = SimpleNamespace(
        block_manager=SimpleNamespace(block_size=16, num_blocks=100), device=torch.device("cuda", 0)
    )
    stats = EngineStats(num_running=3, num_waiting=4, kv_blocks_used=25, kv_blocks_total=100,
                        gpu_slots_total=4)  # fmt: skip

    def lora_status(self) -> dict[str, str]:
        return {"a@v1": "gpu", "a@v2": "cpu", "b@v1": "disk", "c@v3": "disk"}

    def waiting_lora_ids(self) -> set[str]:
        return {"b@v1", "c@v3"}


def test_waiting_adapters_and_values_from_the_engine() -> None:
    models = ModelTable("base", "/m", 64)
    for task, version in (("a", "v1"), ("a", "v2"), ("b", "v1"), ("c", "v3")):
        models.add_version(task, version, "/x")
    for task, version in (("a", "v1"), ("b", "v1"), ("c", "v1")):
        if models.is_served(task, version):
            models.set_stable(task, version)
    registry = CollectorRegistry()
    registry.register(VLLMCollector(_Engine(), models))
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    assert families["vllm:num_requests_running"].samples[0].value == 3
    assert families["vllm:num_requests_waiting"].samples[0].value == 4
    assert families["vllm:kv_cache_usage_perc"].samples[0].value == 0.25
    assert families["vllm:gpu_cache_usage_perc"].samples[0].value == 0.25  # the older name
    labels = lora_info(families)
    assert labels["max_lora"] == "4"
    assert labels["running_lora_adapters"] == "a,a@v1"
    assert labels["waiting_lora_adapters"] == "b,b@v1,c@v3"  # c's stable is not v3


def test_inference_pool_manifests_parse_and_start_serve_with_valid_flags() -> None:
    """deploy/inference-pool.md: the YAML parses, the container's args are flags `peftserve
    serve` accepts, and the pool targets the port the server listens on."""
    text = (Path(__file__).resolve().parent.parent / "deploy" / "inference-pool.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    docs = [doc for block in blocks for doc in yaml.safe_load_all(block)]
    kinds = {doc["kind"]: doc for doc in docs}
    assert {"Deployment", "InferencePool", "HTTPRoute"} <= set(kinds)
    [container] = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    settings = serve_settings(build_parser().parse_args(["serve", *container["args"]]), {})
    assert settings.server.adapter == ["sql=/adapters/sql", "chat=/adapters/chat"]
    pool = kinds["InferencePool"]["spec"]
    assert [p["number"] for p in pool["targetPorts"]] == [settings.server.port]
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= labels.items()
    for name in (*PROTOCOL_GAUGES, "vllm:lora_requests_info", "vllm:cache_config_info"):
        assert f"`{name}`" in text
