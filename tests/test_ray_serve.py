"""peftserve on Ray Serve, end to end: a 3-node ``ray.cluster_utils.Cluster`` on this machine.

The head node runs the ingress replicas (2), the rollout controller and Serve's HTTP proxy; two
worker nodes run one engine replica each (1 CPU, the bundled demo model), on a temporary data
directory. The tests run in order on the one deployment (they share its state, as a fleet
would): exact answers through the openai SDK; an upload through one ingress replica served by
every other; sticky routing across ingress replicas with both arms on the same engine replicas;
a compressed rollout that promotes ``reverse@v2`` and one that rolls back
``reverse@v2-regressed``, each with samples from both engine replicas; then, mid-rollout, an
engine replica killed, the controller killed, and a worker node removed, with client traffic
flowing and every answer checked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from peftserve.canary.router import bucket, routing_key, threshold
from peftserve.client import Client
from peftserve.config import DEFAULT_ADAPTERS_DIR
from peftserve.demo import ROLLOUT as DEMO_ROLLOUT
from peftserve.registry import db

ray = pytest.importorskip("ray", reason="peftserve[ray] is installed with the dev requirements")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from peftserve.cli import build_parser, serve_settings  # noqa: E402
from peftserve.server.ray_app import APP_NAME, application  # noqa: E402

HEAD, ENGINE_NODE = "peftserve_head", "peftserve_engine"
OPTIONS = {
    "Engine": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0, "resources": {ENGINE_NODE: 1}}},
    "Controller": {"ray_actor_options": {"num_cpus": 0, "resources": {HEAD: 1}}},
    "Ingress": {"ray_actor_options": {"num_cpus": 0, "resources": {HEAD: 1}}},
}
"""Deployments pinned to nodes: engines on the workers, everything else on the head."""
FLAGS = [
    "--engine-replicas", "2", "--ingress-replicas", "2", "--engine-max-ongoing-requests", "4",
    "--snapshot-interval-s", "0.5", "--kv-cache-memory-gb", "0.25", "--canary-interval-s", "1",
    "--probes-per-tick", "20", "--probe-max-tokens", "16", "--promote-keep-warm-s", "5",
    "--rollback-keep-warm-s", "5", "--log-level", "warning",
]  # fmt: skip
EVAL = DEFAULT_ADAPTERS_DIR / "eval" / "reverse.jsonl"
COMPRESSED = {**DEMO_ROLLOUT, "steps": [50]}
"""The demo's rollout (``peftserve demo``) in one step."""
HELD = dict(
    steps=[50], interval=3600.0,
    analysis={"metrics": [{"name": "error_rate", "kind": "proportion", "direction": "increase",
                           "tolerance": 0.01, "critical": True}], "min_samples": 10},
)  # fmt: skip
"""A rollout that stays at 50 % (its step never ends) while replicas come and go under it."""
SATURATING = 16
"""Client threads that keep every engine replica's slots full (2 x --engine-max-ongoing-requests,
twice over): whichever replica is lost has requests in flight, so its loss is exercised."""
SETTLE_S = 2.0
"""Four snapshot intervals: every ingress replica has the latest snapshot, every push arrived."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Fleet:
    url: str
    cluster: Any
    workers: list[Any]
    data_dir: str

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def status(self) -> dict[str, Any]:
        with self.http() as http:
            response = http.get("/admin/rollouts/reverse")
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    ray_dir = tempfile.mkdtemp(prefix="pr", dir="/tmp")  # short: Ray's socket paths live under it
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_TMPDIR=ray_dir, RAY_USAGE_STATS_ENABLED="0")
    data_dir = tempfile.mkdtemp(prefix="peftserve-ray-data-")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {HEAD: 100}, "include_dashboard": False})  # fmt: skip
    try:
        workers = [cluster.add_node(num_cpus=1, resources={ENGINE_NODE: 1}) for _ in range(2)]
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        argv = ["serve", "--ray", "--device", "cpu", "--data-dir", data_dir, *FLAGS]
        settings = serve_settings(build_parser().parse_args(argv), environ={})
        serve.run(application(settings, OPTIONS), name=APP_NAME, route_prefix="/")
        yield Fleet(f"http://127.0.0.1:{port}", cluster, workers, data_dir)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        shutil.rmtree(ray_dir, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)


def _eval_items() -> list[dict[str, str]]:
    return [json.loads(line) for line in EVAL.read_text().splitlines() if line.strip()]


@dataclass
class Traffic:
    """Users sending ``reverse`` prompts of the eval set from ``workers`` threads; every answer is
    checked (status, exact text) and kept with the headers naming what served it."""

    url: str
    workers: int = 8
    users: int = 400
    stop: threading.Event = field(default_factory=threading.Event)
    answers: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        items = _eval_items()
        for i in range(self.workers):
            t = threading.Thread(target=self._run, args=(i, items), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _run(self, seed: int, items: list[dict[str, str]]) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stop.is_set():
                item, user = rng.choice(items), f"user-{rng.randrange(self.users)}"
                body = {"model": "reverse", "prompt": item["prompt"], "max_tokens": 16,
                        "temperature": 0, "user": user}  # fmt: skip
                try:
                    r = http.post("/v1/completions", json=body)
                    text = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
                    answer = dict(status=r.status_code, exact=text == item["answer"], user=user,
                                  version=r.headers.get("x-peftserve-version"), arm=r.headers.get("x-peftserve-arm"),
                                  ingress=r.headers.get("x-peftserve-ingress"), text=text)  # fmt: skip
                except httpx.HTTPError as exc:
                    answer = dict(status=None, exact=False, user=user, text=repr(exc))
                with self.lock:
                    self.answers.append(answer)

    def count(self) -> int:
        with self.lock:
            return len(self.answers)

    def failures(self) -> list[dict[str, Any]]:
        with self.lock:
            return [a for a in self.answers if a["status"] != 200]


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _engine_actors() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#Engine#"))  # fmt: skip


def _running(deployment: str) -> int:
    status = serve.status().applications[APP_NAME].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def _ended(fleet: Fleet, candidate: str, timeout: float = 240.0) -> dict[str, Any]:
    """The rollout's status once it ended (or paused); on a timeout, the error says where it stood."""
    try:
        return _wait(lambda: (s := fleet.status())["state"] in ("promoted", "rolled_back", "paused") and s,
                     timeout, f"the {candidate} rollout to end")  # fmt: skip
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it stands at: {fleet.status()['summary']}") from None


def _start(fleet: Fleet, candidate: str, **options: Any) -> None:
    with Client(fleet.url) as client:
        client.start_rollout("reverse", candidate, **options)


def _end_active(fleet: Fleet) -> None:
    with Client(fleet.url) as client, contextlib.suppress(Exception):
        if client.rollout("reverse").active:
            client.rollback_rollout("reverse", "next test")


# ---- the tests, in order --------------------------------------------------------------------


def test_demo_answers_are_exact_through_the_openai_sdk(fleet):
    from openai import OpenAI

    client = OpenAI(base_url=f"{fleet.url}/v1", api_key="none")
    cases = [("reverse", "reverse: quflkbf\n", "fbklfuq"), ("sort", "sort: uss\n", "ssu"),
             ("add", "add: 720+0\n", "720"), ("base", "reverse: quflkbf\n", "quflkbf")]  # fmt: skip
    for model, prompt, answer in cases:
        got = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        assert got.choices[0].text == answer, (model, got)
        chunks = client.completions.create(
            model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in chunks) == answer, model
    assert {m.id for m in client.models.list()} >= {"base", "reverse", "sort", "add"}


def test_an_upload_through_one_ingress_replica_is_served_by_every_other(fleet):
    with fleet.http() as http:
        for version, folder in (("v2", "reverse-v2"), ("v2-regressed", "reverse-v2-regressed")):
            files = {n: (n, (DEFAULT_ADAPTERS_DIR / folder / n).read_bytes())
                     for n in ("adapter_config.json", "adapter_model.safetensors")}  # fmt: skip
            r = http.put(f"/admin/adapters/reverse/{version}", files=files)
            assert r.status_code == 201, r.text
            uploaded_through = r.headers["x-peftserve-ingress"]
        time.sleep(SETTLE_S)
        served_by: Counter = Counter()
        for _ in range(40):
            r = http.post("/v1/completions", json={"model": "reverse@v2", "prompt": "reverse: quflkbf\n",
                                                   "max_tokens": 16, "temperature": 0})  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == "fbklfuq"
            assert r.headers["x-peftserve-version"] == "reverse@v2"
            served_by[r.headers["x-peftserve-ingress"]] += 1
    assert len(served_by) == 2, served_by  # both ingress replicas, without a restart
    assert uploaded_through in served_by
    with Client(fleet.url) as client:  # peftserve.Client works against the Ray ingress unchanged
        assert {a.version for a in client.list("reverse")} >= {"v2", "v2-regressed"}
    with fleet.http() as http:  # the API document is the controller's: every route in it
        paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/admin/adapters/{task}/{version}", "/v1/feedback"} <= set(paths)


def test_feedback_is_accepted_through_any_ingress_replica_at_once(fleet):
    """A completion's record reaches the controller with its ingress's next push; feedback sent
    at once through the other replica waits for it (the id says when it was issued)."""
    answered_by, feedback_by = set(), set()
    with fleet.http() as http:
        for i in range(16):
            r = http.post("/v1/completions", json={"model": "sort", "prompt": "sort: uss\n", "max_tokens": 8,
                                                   "temperature": 0, "user": f"fb-{i}"})  # fmt: skip
            assert r.status_code == 200
            answered_by.add(r.headers["x-peftserve-ingress"])
            f = http.post("/v1/feedback", json={"id": r.json()["id"], "score": 1.0})
            assert f.status_code == 200, f.text
            feedback_by.add((r.headers["x-peftserve-ingress"], f.headers["x-peftserve-ingress"]))
        assert http.post("/v1/feedback", json={"id": "cmpl-unknown", "score": 1}).status_code == 404
    assert any(a != b for a, b in feedback_by), feedback_by  # at least once through the other one


def test_routing_is_sticky_per_user_across_ingress_replicas_and_both_arms_share_engine_replicas(
    fleet,
):
    _start(fleet, "v2", **HELD)
    time.sleep(SETTLE_S)
    users = [f"sticky-{i}" for i in range(40)]
    seen: dict[str, set[tuple[str, str]]] = {u: set() for u in users}
    ingresses: Counter = Counter()
    with fleet.http() as http:
        for _ in range(3):
            for user in users:
                r = http.post("/v1/completions", json={"model": "reverse", "prompt": "reverse: piu\n",
                                                       "max_tokens": 8, "temperature": 0, "user": user})  # fmt: skip
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == "uip", r.text
                seen[user].add((r.headers["x-peftserve-version"], r.headers["x-peftserve-arm"]))
                ingresses[r.headers["x-peftserve-ingress"]] += 1
    assert len(ingresses) == 2, ingresses
    arms: Counter = Counter()
    for user, served in seen.items():
        assert len(served) == 1, (user, served)  # one version per user, whichever replica answered
        version, arm = next(iter(served))
        if bucket("reverse", routing_key(user, {}, "")) < threshold(50):
            assert (version, arm) == ("reverse@v2", "candidate"), user
        else:
            assert arm == "stable" and version != "reverse@v2", (user, version, arm)
        arms[arm] += 1
    assert arms["candidate"] and arms["stable"], arms
    time.sleep(SETTLE_S)
    judged = fleet.status()["arms"]
    stable, candidate = judged["stable"]["replicas"], judged["candidate"]["replicas"]
    assert stable and candidate, judged
    assert set(stable) == set(candidate), judged  # the arms share the task's engine replicas


def test_a_compressed_rollout_promotes_v2_with_samples_from_both_engine_replicas(fleet):
    _end_active(fleet)
    with Traffic(fleet.url) as traffic:
        _start(fleet, "v2", eval_set=EVAL, **COMPRESSED)
        status = _ended(fleet, "v2")
    assert status["state"] == "promoted", status["summary"]
    assert not traffic.failures(), traffic.failures()[:3]
    assert all(a["exact"] for a in traffic.answers)
    assert len(status["arms"]["candidate"]["replicas"]) == 2, status["arms"]
    assert len(status["arms"]["stable"]["replicas"]) == 2, status["arms"]


def test_a_compressed_rollout_rolls_back_the_regressed_version_with_samples_from_both_replicas(
    fleet,
):
    with Traffic(fleet.url) as traffic:
        _start(fleet, "v2-regressed", eval_set=EVAL, **COMPRESSED)
        status = _ended(fleet, "v2-regressed")
    assert status["state"] == "rolled_back", status["summary"]
    assert "probe_accuracy" in status["last_decision"]["reason"], status["last_decision"]
    assert not traffic.failures(), traffic.failures()[:3]
    judged = {arm: status["arms"][arm]["replicas"] for arm in ("stable", "candidate")}
    assert len(set(judged["stable"]) | set(judged["candidate"])) == 2, judged


def _held_rollout(fleet: Fleet) -> dict[str, Any]:
    """A rollout of reverse@v1 (the former stable) held at 50 %, started if there is none."""
    status = fleet.status()
    if not status["active"]:
        with Client(fleet.url) as client:
            versions = [a.version for a in client.list("reverse")]
        _start(fleet, versions[0], **HELD)
        time.sleep(SETTLE_S)
        status = fleet.status()
    assert status["state"] == "ramping" and status["weight"] == 50.0, status["summary"]
    return status


def test_an_engine_replica_killed_mid_rollout_costs_no_request_and_leaves_the_rollout_as_it_was(
    fleet,
):
    before = _held_rollout(fleet)
    victims = _engine_actors()
    assert len(victims) == 2, victims
    with Traffic(fleet.url, workers=SATURATING) as traffic:
        _wait(lambda: traffic.count() > 20, 60, "traffic")
        ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
        sent = traffic.count()
        _wait(lambda: traffic.count() > sent + 40, 120, "traffic after the kill")
    assert not traffic.failures(), traffic.failures()[:3]  # one retry each, invisible to clients
    assert all(a["exact"] for a in traffic.answers)
    after = fleet.status()
    assert (after["rollout_id"], after["state"], after["weight"]) == (
        before["rollout_id"],
        "ramping",
        50.0,
    )
    _wait(lambda: _running("Engine") == 2 and victims[0] not in _engine_actors(), 180,
          "Ray Serve to replace the engine replica")  # fmt: skip
    pages = _scrape(fleet)
    assert sum(_sum(p, "peftserve_engine_retries_total") for p in pages.values()) > 0, (
        "no retry: nothing in flight?"
    )
    for page in pages.values():  # each ingress exports the controller's rollout series too
        assert 'peftserve_canary_weight_ratio{task="reverse"} 0.5' in page
        assert 'peftserve_rollout_state{state="ramping",task="reverse"} 1.0' in page


def _scrape(fleet: Fleet) -> dict[str, str]:
    """/metrics of each ingress replica (through the proxy until both answered)."""
    pages: dict[str, str] = {}
    with fleet.http() as http:
        for _ in range(40):
            r = http.get("/metrics")
            pages[r.headers["x-peftserve-ingress"]] = r.text
            if len(pages) == 2:
                break
    return pages


def _sum(page: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith(prefix)
    )


def _retries(fleet: Fleet) -> float:
    """peftserve_engine_retries_total summed over both ingress replicas."""
    return sum(_sum(page, "peftserve_engine_retries_total") for page in _scrape(fleet).values())


def test_the_controller_killed_mid_rollout_comes_back_at_the_same_state_and_weight(fleet):
    before = _held_rollout(fleet)
    epoch = db.lease_epoch(fleet.data_dir)
    controller = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#Controller#"))  # fmt: skip
    with Traffic(fleet.url) as traffic:
        _wait(lambda: traffic.count() > 20, 60, "traffic")
        ray.kill(ray.get_actor(controller, namespace="serve"), no_restart=True)
        sent = traffic.count()
        _wait(lambda: traffic.count() > sent + 40, 120, "traffic while the controller is away")
        after = _wait(lambda: _status_or_none(fleet), 180, "the new controller")
    assert not traffic.failures(), traffic.failures()[:3]  # ingresses route on their last snapshot
    assert (after["rollout_id"], after["state"], after["weight"]) == (
        before["rollout_id"],
        "ramping",
        50.0,
    )
    assert db.lease_epoch(fleet.data_dir) == epoch + 1  # the new controller holds the lease
    with Client(fleet.url) as client:
        events = client.rollout_history("reverse", kinds=["restored"])
    assert events and events[-1].rollout_id == before["rollout_id"]
    assert "ramping at 50 %" in events[-1].reason


def _status_or_none(fleet: Fleet) -> dict[str, Any] | None:
    with contextlib.suppress(httpx.HTTPError):
        return fleet.status()
    return None


def test_removing_a_worker_node_mid_rollout_loses_no_acknowledged_request(fleet):
    before = _held_rollout(fleet)
    retried = _retries(fleet)
    with Traffic(fleet.url, workers=SATURATING) as traffic:
        _wait(lambda: traffic.count() > 20, 60, "traffic")
        fleet.cluster.remove_node(fleet.workers[0])
        sent = traffic.count()
        _wait(lambda: traffic.count() > sent + 40, 180, "traffic after the node left")
    assert not traffic.failures(), traffic.failures()[:3]
    assert all(a["exact"] for a in traffic.answers)  # every acknowledged request answered right
    assert _retries(fleet) > retried  # requests in flight on the lost node were retried
    after = fleet.status()
    assert (after["rollout_id"], after["state"], after["weight"]) == (
        before["rollout_id"],
        "ramping",
        50.0,
    )
