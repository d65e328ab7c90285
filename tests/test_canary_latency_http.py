"""Latency judged fairly on a real server, over real HTTP, with concurrent users.

A minority adapter shares its engine steps with the majority's, so its requests see mixed
batches that the majority's mostly do not: raw per-request latency would read a same-quality
candidate at 10 % as slower. The judge compares probes run on twins of both versions instead.
Here a same-quality candidate (stable's weights plus 1 % noise) at 10 % under four concurrent
users is promoted, and a candidate made artificially slower (every engine step holding one of
its sequences sleeps 40 ms: everyone batched with it pays) is rolled back on latency. Timings
are compressed (a controller round every 0.3 s, one 10 % step of 1 s); a few tens of seconds.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from safetensors.torch import load_file, save_file

from peftserve.client import Client
from peftserve.engine.model_runner import ModelRunner
from tests.server_utils import running_server
from tests.tiny_models import make_peft_adapter, make_tiny_model

SLOW_S = 0.04
ANALYSIS = {
    "min_samples": 10,
    "metrics": [
        {"name": "error_rate", "kind": "proportion", "direction": "increase", "tolerance": 0.0, "mde": 0.5},
        {"name": "latency", "kind": "continuous", "direction": "increase", "tolerance": 0.3, "mde": 1.0,
         "relative": True},
    ],
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("latency")
    model = make_tiny_model(root / "model", "llama")
    stable = make_peft_adapter(model, root / "stable", seed=3, std=0.2)
    same = root / "same"
    same.mkdir()
    weights = load_file(stable / "adapter_model.safetensors")
    save_file({k: v * (1 + 0.01 * (2 * (hash(k) % 2) - 1)) for k, v in weights.items()},
              same / "adapter_model.safetensors")
    (same / "adapter_config.json").write_text((stable / "adapter_config.json").read_text())
    monkey = pytest.MonkeyPatch()
    execute = ModelRunner.execute

    def slow_execute(self, sched):  # the "slow" version costs every step it is in 40 ms more
        if any(seq.lora_id and seq.lora_id.startswith("t@slow") for seq in sched.seqs):
            time.sleep(SLOW_S)
        return execute(self, sched)

    monkey.setattr(ModelRunner, "execute", slow_execute)
    try:
        with running_server(model, canary_interval_s=0.3, probes_per_tick=3, probe_max_tokens=6,
                            rollback_keep_warm_s=0, promote_keep_warm_s=0) as url:
            with Client(url) as client:
                for version, path in (("v1", stable), ("v2", same), ("slow", same)):
                    client.upload(path, "t", version)
            yield url
    finally:
        monkey.undo()


class Users:
    """Four users' worth of concurrent traffic on task ``t`` (many user ids, so both arms get some)."""

    def __init__(self, url: str, workers: int = 4) -> None:
        self.url = url
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self.stop.is_set():
                body = {"model": "t", "prompt": "abc " * rng.randint(1, 6), "max_tokens": 6, "temperature": 0,
                        "user": f"user-{rng.randrange(10_000)}"}
                http.post("/v1/completions", json=body)

    def __enter__(self) -> Users:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _until_done(client: Client, task: str, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    rollout = client.rollout(task)
    while rollout.active and time.monotonic() < deadline:
        time.sleep(0.5)
        rollout = client.rollout(task)
    return rollout


def test_same_quality_candidate_is_promoted_and_a_slower_one_rolled_back_on_latency(served: str) -> None:
    with Users(served), Client(served) as client:
        client.start_rollout("t", "v2", steps=[10], step_interval_s=1.0, analysis=ANALYSIS)
        rollout = _until_done(client, "t", 120)
        assert rollout.state == "promoted", [m["detail"] for m in rollout.last_judgment.metrics]
        latency = next(m for m in rollout.last_judgment.metrics if m["name"] == "latency")
        assert latency["status"] == "pass" and "twin" in latency["test"]

        client.start_rollout("t", "slow", steps=[10], step_interval_s=1.0, analysis=ANALYSIS)
        rollout = _until_done(client, "t", 120)
        assert rollout.state == "rolled_back", rollout.summary
        decision = [e for e in client.rollout_history("t", kinds=["decision"]) if e.action == "rollback"][-1]
        assert decision.metric == "latency" and "critical metric failed" in decision.reason
        latency = next(m for m in rollout.last_judgment.metrics if m["name"] == "latency")
        assert latency["lower"] > 0.3  # shown slower than the tolerance, at every look's level
