"""Latency judged fairly on a real server, over real HTTP, with concurrent users.

A minority adapter shares its engine steps with the majority's, so its requests see mixed
batches that the majority's mostly do not: raw per-request latency would read a same-quality
candidate at 10 % as slower. The judge compares probes run on twins of both versions instead.
Here a same-quality candidate (stable's weights plus 1 % noise) at 10 % under four concurrent
users is promoted, and a candidate made artificially slower (every engine step holding one of
its sequences takes three times as long, at least 40 ms more: everyone batched with it pays) is
rolled back on latency. The slowdown is relative to the step's own time, so it reads the same
on a loaded machine, where every step is slower. Timings are compressed (a controller round
every 0.3 s, one 10 % step of 1 s); the test waits on the controller's own transition to a
final state (an event, not a polling sleep), so a slow machine only makes it take longer.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from safetensors.torch import load_file, save_file

from peftserve.canary.controller import RolloutController
from peftserve.canary.spec import TERMINAL_STATES
from peftserve.client import Client
from peftserve.engine.model_runner import ModelRunner
from tests.server_utils import running_server
from tests.tiny_models import make_peft_adapter, make_tiny_model

SLOW_S = 0.04
"""The slow version's steps take at least this much more (and at least twice their own time more)."""
DECISION_TIMEOUT_S = 300.0
"""A generous bound on one rollout's decision (about 10 s on an idle machine)."""
ANALYSIS = {
    "min_samples": 10,
    "metrics": [
        {
            "name": "error_rate",
            "kind": "proportion",
            "direction": "increase",
            "tolerance": 0.0,
            "mde": 0.5,
        },
        {
            "name": "latency",
            "kind": "continuous",
            "direction": "increase",
            "tolerance": 0.3,
            "mde": 1.0,
            "relative": True,
        },
    ],
}


@dataclass
class Served:
    url: str
    ended: queue.Queue[tuple[str, str]]
    """(task, final state) of every rollout the controller ends, put by its own transition."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("latency")
    model = make_tiny_model(root / "model", "llama")
    stable = make_peft_adapter(model, root / "stable", seed=3, std=0.2)
    same = root / "same"
    same.mkdir()
    weights = load_file(stable / "adapter_model.safetensors")
    save_file(
        {k: v * (1 + 0.01 * (2 * (hash(k) % 2) - 1)) for k, v in weights.items()},
        same / "adapter_model.safetensors",
    )
    (same / "adapter_config.json").write_text((stable / "adapter_config.json").read_text())
    monkey = pytest.MonkeyPatch()
    execute, transition = ModelRunner.execute, RolloutController._transition
    ended: queue.Queue[tuple[str, str]] = queue.Queue()

    # the "slow" version (and its probe twin) triples every step it is in
    def slow_execute(self, sched):
        if not any(seq.lora_id and seq.lora_id.startswith("t@slow") for seq in sched.seqs):
            return execute(self, sched)
        start = time.perf_counter()
        out = execute(self, sched)
        time.sleep(max(SLOW_S, 2 * (time.perf_counter() - start)))
        return out

    async def noting_transition(self, live, *args, **kwargs):
        new = await transition(self, live, *args, **kwargs)
        if new.state in TERMINAL_STATES:
            ended.put((new.spec.task, new.state))
        return new

    monkey.setattr(ModelRunner, "execute", slow_execute)
    monkey.setattr(RolloutController, "_transition", noting_transition)
    try:
        with running_server(
            model,
            canary_interval_s=0.3,
            probes_per_tick=3,
            probe_max_tokens=6,
            rollback_keep_warm_s=0,
            promote_keep_warm_s=0,
        ) as url:
            with Client(url) as client:
                for version, path in (("v1", stable), ("v2", same), ("slow", same)):
                    client.upload(path, "t", version)
            yield Served(url, ended)
    finally:
        monkey.undo()


class Users:
    """Four users' worth of concurrent traffic on task ``t`` (many user ids, so both arms get some)."""

    def __init__(self, url: str, workers: int = 4) -> None:
        self.url = url
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)
        ]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self.stop.is_set():
                body = {
                    "model": "t",
                    "prompt": "abc " * rng.randint(1, 6),
                    "max_tokens": 6,
                    "temperature": 0,
                    "user": f"user-{rng.randrange(10_000)}",
                }
                http.post("/v1/completions", json=body)

    def __enter__(self) -> Users:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _decided(served: Served, client: Client, task: str):
    """The rollout once the controller has ended it (waits on its transition, not on a timer)."""
    try:
        ended_task, state = served.ended.get(timeout=DECISION_TIMEOUT_S)
    except queue.Empty:
        pytest.fail(f"no decision in {DECISION_TIMEOUT_S:g} s: {client.rollout(task).summary}")
    rollout = client.rollout(task)
    assert (ended_task, state) == (task, rollout.state)
    return rollout


def _names_test_margin_and_evidence(decision, latency_status: str) -> None:
    """The audit of a move lists every metric's test, margin and evidence, not only the deciding one's."""
    lines = (line.split(": ", 1) for line in decision.payload["evidence"])
    # segments (name[label]) aside
    evidence = {name: words for name, words in lines if "[" not in name}
    assert set(evidence) == {"error_rate", "latency"}, decision.payload
    assert "exact conditional-binomial e-process" in evidence["error_rate"]
    assert (
        "tolerance +0, mde +0.5" in evidence["error_rate"] and "samples" in evidence["error_rate"]
    )
    assert (
        "twin of stable" in evidence["latency"]
        and "tolerance +30.0%, mde +100.0%" in evidence["latency"]
    )
    assert "engine time per step" in evidence["latency"] and "harm" in evidence["latency"]
    assert evidence["latency"].endswith(f"-> {latency_status}"), evidence["latency"]


def test_same_quality_candidate_is_promoted_and_a_slower_one_rolled_back_on_latency(
    served: Served,
) -> None:
    with Users(served.url), Client(served.url) as client:
        client.start_rollout("t", "v2", steps=[10], interval=1.0, analysis=ANALYSIS)
        rollout = _decided(served, client, "t")
        assert rollout.state == "promoted", [m["detail"] for m in rollout.last_judgment.metrics]
        latency = next(m for m in rollout.last_judgment.metrics if m["name"] == "latency")
        assert latency["status"] == "pass" and "twin" in latency["test"]
        promote = [
            e for e in client.rollout_history("t", kinds=["decision"]) if e.action == "promote"
        ][-1]
        _names_test_margin_and_evidence(promote, "pass")

        client.start_rollout("t", "slow", steps=[10], interval=1.0, analysis=ANALYSIS)
        rollout = _decided(served, client, "t")
        assert rollout.state == "rolled_back", rollout.summary
        decision = [
            e for e in client.rollout_history("t", kinds=["decision"]) if e.action == "rollback"
        ][-1]
        assert decision.metric == "latency" and "critical metric failed" in decision.reason
        assert "engine time per step" in decision.reason and "tolerance +30.0%" in decision.reason
        _names_test_margin_and_evidence(decision, "fail")
        latency = next(m for m in rollout.last_judgment.metrics if m["name"] == "latency")
        assert latency["lower"] > 0.3  # shown slower than the tolerance, at every look's level
