"""The parts of the Ray Serve composition, without a cluster: samples in transit, snapshots,
the controller lease, the remote engine's retry, the node's adapter file cache, feedback on a
completion whose record is still on its way, and admin calls forwarded through an app."""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi import FastAPI, Request

from peftserve.canary.metrics import MetricWindows
from peftserve.canary.samples import BatchShare, RequestRecord
from peftserve.canary.spec import Rollout, RolloutSpec
from peftserve.canary.store import RolloutStore
from peftserve.config import DEFAULT_ADAPTERS_DIR
from peftserve.engine.engine import QueueFull, UnknownAdapter
from peftserve.engine.outputs import RequestOutput
from peftserve.engine.sampling_params import SamplingParams
from peftserve.registry import db
from peftserve.registry.digest import content_sha256
from peftserve.server.completion_ids import issued_at, new_completion_id
from peftserve.server.errors import APIError
from peftserve.server.fleet import ModelView
from peftserve.server.model_table import ModelTable
from peftserve.server.samples import SampleBuffer, SampleCall, apply
from peftserve.server.snapshot import FleetView, Snapshot, SnapshotSource, VersionInfo

ray_exceptions = pytest.importorskip("ray.exceptions")


# ---- samples -------------------------------------------------------------------------------


def _record(version: str, unit: int, replica: str, **outcome) -> RequestRecord:
    return RequestRecord("reverse", version, unit, "50%", 100.0, arm="candidate" if version == "v2" else "stable",
                         segments=("length=0-63", "meta:team=a"), replica=replica, **outcome)  # fmt: skip


def test_samples_travel_as_the_judges_own_records_in_plain_form():
    """What an ingress records reaches the controller's windows as the same records: unit,
    stratum, segments, step share and replica, whatever process made them."""
    clock = iter([101.0, 102.0, 103.0])
    buffer = SampleBuffer(clock=lambda: next(clock))
    share = BatchShare(steps=4, step_s=0.02, tokens=40, stable_steps=4, stable_tokens=20, candidate_steps=4,
                       candidate_tokens=12)  # fmt: skip
    answered = _record("v2", 7, "r1", e2e=0.5, output_tokens=7, finish_reason="stop", batch=share)
    buffer.record(answered)
    buffer.record(_record("v2", 8, "r2", error=True, finish_reason="error"))
    buffer.record(_record("v1", 9, "r2", e2e=0.4, output_tokens=7, finish_reason="stop"))
    buffer.register_completion("cmpl-1", answered)
    buffer.record_shadow("reverse", "v2", exact_match=True, llr=0.01, e2e=0.3, error=False)
    with pytest.raises(AttributeError):
        buffer.evidence  # noqa: B018  (reading is the controller's business)
    calls = buffer.take()
    assert [c.method for c in calls] == [
        "record", "record", "record", "register_completion", "record_shadow",
    ]  # fmt: skip
    assert calls[3].kwargs["at"] == 101.0 and calls[4].kwargs["at"] == 102.0
    assert calls[0].args == ({"request_record": answered.to_dict()},)  # plain data on the wire
    assert len(buffer) == 0

    windows = MetricWindows(clock=lambda: 200.0)
    applied = apply(windows, [*calls, SampleCall("forget", ("reverse",))])
    assert applied == 5  # forget is not a recording call
    candidate = windows.summary("reverse", "v2")
    assert candidate["in_experiment"] == 2 and candidate["errors"] == 1
    assert candidate["replicas"] == {"r1": 1, "r2": 1}
    assert windows.summary("reverse", "v1")["replicas"] == {"r2": 1}
    evidence = windows.evidence("reverse", "v1", "v2")
    assert set(evidence.strata) == {"50%"} and "meta:team=a" in evidence.segments
    assert evidence.total("v2", "requests", evidence.segments["meta:team=a"]) == 2
    assert windows.shadow_summary("reverse", "v2")["n"] == 1
    assert windows.record_feedback("cmpl-1", 1.0)  # the completion came with its record
    assert windows.evidence("reverse", "v1", "v2").total("v2", "feedback_n") == 1


def test_a_failed_push_goes_first_next_time_and_a_full_buffer_drops_the_oldest():
    buffer = SampleBuffer(max_pending=3, clock=lambda: 1.0)
    for i in range(2):
        buffer.record_noise_floor("t", float(i))
    first = buffer.take()
    buffer.record_noise_floor("t", 2.0)
    buffer.put_back(first)
    assert [c.args[1] for c in buffer.take()] == [0.0, 1.0, 2.0]
    for i in range(5):
        buffer.record_noise_floor("t", float(i))
    assert [c.args[1] for c in buffer.take()] == [2.0, 3.0, 4.0] and buffer.dropped == 2


# ---- snapshots ------------------------------------------------------------------------------


def _table() -> ModelTable:
    table = ModelTable(base_name="base", base_root="m", max_model_len=64)
    table.add_version("reverse", "v1", "/a/v1", 1.0, "a" * 64)
    table.add_version("reverse", "v2", "/a/v2", 2.0, "b" * 64)
    table.set_stable("reverse", "v1")
    return table


def test_a_snapshot_makes_an_ingress_table_route_exactly_like_the_controllers():
    controller, ingress = _table(), ModelTable(base_name="base", base_root="m", max_model_len=64)
    source = SnapshotSource(controller, epoch=3)
    first = source.take()
    assert first.key == (3, 1) and source.take().key == (3, 1)  # no change, same serial
    rollout = Rollout.start(RolloutSpec("reverse", "v1", "v2", steps=(30.0,)), now=0.0)
    controller.router.set_rollout(rollout)
    second = source.take()
    assert second.key == (3, 2) and second.sha256("reverse", "v2") == "b" * 64

    from peftserve.server.snapshot import install

    install(ingress, second)
    for user in (f"u{i}" for i in range(200)):
        mine, theirs = (
            ingress.resolve("reverse", user=user),
            controller.resolve("reverse", user=user),
        )
        assert (mine.version, mine.arm) == (theirs.version, theirs.arm)
    assert ingress.resolve("reverse@v2").version == "v2"
    assert [c.id for c in ingress.cards()] == [c.id for c in controller.cards()]


def test_an_ingress_never_takes_routing_back_to_an_older_snapshot():
    from peftserve.server.link import ControllerLink

    table = ModelTable(base_name="base", base_root="m", max_model_len=64)
    link = ControllerLink(None, table, "ingress-1", 1.0)  # type: ignore[arg-type]
    versions = {
        "reverse": {"v1": VersionInfo("/a", 1, "a" * 64), "v2": VersionInfo("/b", 2, "b" * 64)}
    }
    newer = Snapshot(2, 1, {"reverse": "v2"}, versions, ())
    older = Snapshot(1, 9, {"reverse": "v1"}, versions, ())  # a replaced controller's last word
    assert link.install(newer) and not link.install(older)
    assert table.stable("reverse") == "v2"


# ---- the controller lease -------------------------------------------------------------------


def test_a_replaced_controller_cannot_write(tmp_path):
    epoch = db.acquire_lease(tmp_path, "old")
    store = RolloutStore(tmp_path)
    rollout = Rollout.start(RolloutSpec("reverse", "v1", "v2", steps=(10.0,)), now=1.0)
    store.create(rollout, None, [])
    other = db.connect(tmp_path)  # a newer controller takes the lease (another process, here a row)
    other.execute("UPDATE controller_lease SET epoch = epoch + 1, holder = 'new'")
    assert db.lease_epoch(tmp_path) == epoch + 1
    with pytest.raises(db.Fenced, match="replaced this one"):
        store.create(
            Rollout.start(RolloutSpec("other", "v1", "v2", steps=(10.0,)), now=2.0), None, []
        )
    assert [r.spec.task for _, r in store.active()] == ["reverse"]  # nothing was written
    db.release_fence(tmp_path)
    store.close()
    other.close()


# ---- the remote engine ----------------------------------------------------------------------


class FakeStream:
    def __init__(self, outputs, fail_after: int | None, exc: BaseException) -> None:
        self._outputs, self._fail_after, self._exc = list(outputs), fail_after, exc
        self.cancelled = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for i, out in enumerate(self._outputs):
            if self._fail_after is not None and i == self._fail_after:
                raise self._exc
            yield out

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """A deployment handle whose ``generate`` calls follow a script of (outputs, fail_after)."""

    def __init__(self, script, exc: BaseException | None = None) -> None:
        self.script, self.calls, self.exc = list(script), [], exc or ray_exceptions.ActorDiedError()

    def options(self, **kw):
        self.model_id = kw.get("multiplexed_model_id")
        return self

    @property
    def generate(self):
        return self

    def remote(self, *args):
        self.calls.append((self.model_id, *args))
        outputs, fail_after = self.script.pop(0)
        return FakeStream(outputs, fail_after, self.exc)


def _out(
    request_id: str, tokens: list[int], done: bool, prompt: int, completed: int
) -> RequestOutput:
    return RequestOutput(request_id, "x" * len(tokens), tokens, None, done, "stop" if done else None,
                         prompt, completed)  # fmt: skip


def _remote(handle):
    from peftserve.server.fleet import RemoteEngine

    versions = {"reverse": {"v2": VersionInfo("/b", 2, "b" * 64)}}
    snapshot = Snapshot(1, 1, {"reverse": "v2"}, versions, ())
    return RemoteEngine(handle, ModelView.__new__(ModelView), lambda: snapshot)


def test_an_ingress_answers_429_early_only_when_every_engine_replica_is_full() -> None:
    """The routes' early 429 reads the least loaded replica's queue (per the snapshot): one full
    replica is not the fleet's refusal, Ray Serve sends the request to another."""
    from peftserve.server.fleet import RemoteEngine

    fleet = FleetView(("a", "b"), per_replica={"a": {"num_waiting": 64}, "b": {"num_waiting": 3}})
    snapshot: list[Snapshot | None] = [None]
    view = ModelView.__new__(ModelView)
    RemoteEngine(None, view, lambda: snapshot[0])
    assert view.num_waiting == 0  # no snapshot yet: nothing known, nothing refused early
    snapshot[0] = Snapshot(1, 1, {}, {}, (), fleet=fleet)
    assert view.num_waiting == 3
    full = replace(fleet, per_replica={"a": {"num_waiting": 64}, "b": {"num_waiting": 64}})
    snapshot[0] = Snapshot(1, 2, {}, {}, (), fleet=full)
    assert view.num_waiting == 64


async def _collect(engine, params=None):
    params = params or SamplingParams(max_tokens=5, temperature=0.0)
    return [o async for o in engine.generate("cmpl-1", [1, 2, 3], params, "reverse@v2")]


def test_a_request_whose_replica_dies_continues_on_another_after_what_was_delivered():
    first = [
        _out("cmpl-1", [7], False, 3, 1),
        _out("cmpl-1", [8], False, 3, 2),
        _out("cmpl-1", [9], False, 3, 3),
    ]
    second = [_out("cmpl-1-retry", [9], False, 5, 1), _out("cmpl-1-retry", [10], True, 5, 2)]
    handle = FakeHandle([(first, 2), (second, None)])  # dies after delivering two tokens
    engine = _remote(handle)
    outs = asyncio.run(_collect(engine))
    assert [t for o in outs for t in o.token_ids] == [7, 8, 9, 10]
    assert outs[-1].finished and outs[-1].completion_tokens == 4 and outs[-1].prompt_tokens == 3
    assert {o.request_id for o in outs} == {"cmpl-1"}
    (task1, v1, sha1, _, prompt1, p1), (task2, _, _, _, prompt2, p2) = handle.calls
    assert (task1, v1, sha1) == ("reverse", "v2", "b" * 64) and task2 == "reverse"
    assert prompt1 == [1, 2, 3] and prompt2 == [1, 2, 3, 7, 8]  # the delivered tokens, as prompt
    assert (p1.max_tokens, p2.max_tokens) == (5, 3)
    assert engine.retries == {"reverse@v2": 1}


def test_a_second_lost_replica_answers_503_and_engine_errors_come_back_unwrapped():
    from peftserve.server.fleet import ReplicaLost

    lost_twice = FakeHandle(
        [([_out("cmpl-1", [7], False, 3, 1)] * 2, 1), ([_out("cmpl-1-retry", [8], True, 4, 1)], 0)]
    )
    with pytest.raises(ReplicaLost) as info:
        asyncio.run(_collect(_remote(lost_twice)))
    assert (
        isinstance(info.value, APIError)
        and info.value.status == 503
        and info.value.code == "replica_lost"
    )

    wrapped = ray_exceptions.RayTaskError(
        "generate", "traceback text", QueueFull("8 requests are waiting")
    )
    refused = FakeHandle([([_out("cmpl-1", [7], False, 3, 1)], 0)], exc=wrapped)
    with pytest.raises(QueueFull, match="8 requests are waiting"):
        asyncio.run(_collect(_remote(refused)))
    assert len(refused.calls) == 1  # not a lost replica: no retry

    several = SamplingParams(
        max_tokens=5, temperature=0.0, n=2
    )  # choices with prefixes of their own
    lost_mid_choices = FakeHandle([([_out("cmpl-1", [7], False, 3, 1)] * 2, 1)])
    with pytest.raises(ReplicaLost):
        asyncio.run(_collect(_remote(lost_mid_choices), several))
    assert len(lost_mid_choices.calls) == 1  # no continuation of two choices as one
    choices = [
        _out("cmpl-1-retry", [7], True, 3, 1),
        replace(_out("cmpl-1-retry", [8], True, 3, 1), index=1),
    ]
    lost_at_once = FakeHandle([(choices, 0), (choices, None)])  # lost before a token: both choices again
    outs = asyncio.run(_collect(_remote(lost_at_once), several))
    assert [(o.index, o.token_ids, o.request_id) for o in outs] == [
        (0, [7], "cmpl-1"),
        (1, [8], "cmpl-1"),
    ]

    with pytest.raises(UnknownAdapter):  # a version the snapshot does not serve
        asyncio.run(
            _remote(FakeHandle([])).generate("c", [1], SamplingParams(), "reverse@v9").__anext__()
        )


def test_a_probe_twin_runs_on_its_versions_files_and_leaves_replicas_with_its_rollout():
    """The controller's probes run on a version's twin (``reverse@v2#probe``): same task, so
    the replicas holding the task, with v2's files; a replica drops the twin once no active
    rollout compares v2, and keeps v2 itself."""
    from peftserve.server.engine_host import EngineHost, TaskAdapters

    handle = FakeHandle([([_out("probe-1", [7], True, 3, 1)], None)])
    outs = asyncio.run(
        _remote(handle)
        .generate("probe-1", [1, 2, 3], SamplingParams(), "reverse@v2#probe")
        .__anext__()
    )
    assert outs.finished and handle.calls[0][:3] == ("reverse", "v2#probe", "b" * 64)

    class Engine:
        def __init__(self) -> None:
            self.registered = {"reverse@v2": "gpu", "reverse@v2#probe": "gpu"}

        def lora_status(self) -> dict[str, str]:
            return dict(self.registered)

        async def unregister_lora(self, lora_id: str) -> None:
            del self.registered[lora_id]

    engine = Engine()
    host = EngineHost(engine, None, "r1", 8)  # type: ignore[arg-type]
    holder = TaskAdapters("reverse", host)
    holder.versions = {"v2": "b" * 64, "v2#probe": "b" * 64}
    host.tasks["reverse"] = holder
    versions = {
        "reverse": {"v1": VersionInfo("/a", 1, "a" * 64), "v2": VersionInfo("/b", 2, "b" * 64)}
    }
    rollout = Rollout.start(RolloutSpec("reverse", "v1", "v2", steps=(50.0,)), now=0.0)
    asyncio.run(host.reconcile(Snapshot(1, 1, {"reverse": "v1"}, versions, (rollout,))))
    assert set(engine.registered) == {"reverse@v2", "reverse@v2#probe"}  # compared: kept
    asyncio.run(host.reconcile(Snapshot(1, 2, {"reverse": "v2"}, versions, ())))
    assert set(engine.registered) == {"reverse@v2"} and set(holder.versions) == {"v2"}


# ---- adapter files on the node --------------------------------------------------------------


def test_adapter_files_are_fetched_once_per_node_and_checked_against_their_sha256(tmp_path):
    from peftserve.registry.digest import file_sha256
    from peftserve.server.engine_host import AdapterFileCache

    src = DEFAULT_ADAPTERS_DIR / "reverse"
    names = ("adapter_config.json", "adapter_model.safetensors")
    files = {n: (src / n).read_bytes() for n in names}
    sha = content_sha256({n: file_sha256(src / n) for n in names})
    fetched: list[str] = []

    async def fetch(digest: str):
        fetched.append(digest)
        return files

    async def run() -> tuple[Path, Path]:
        cache = AdapterFileCache(tmp_path, fetch)
        paths = await asyncio.gather(cache.path(sha), cache.path(sha))
        other_replica = AdapterFileCache(tmp_path, fetch)  # same node: finds it on disk
        return paths[0], await other_replica.path(sha)

    one, two = asyncio.run(run())
    assert one == two == tmp_path / sha and fetched == [sha]
    assert {p.name for p in one.iterdir()} == set(names)

    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(OSError, match="hash to"):
        asyncio.run(AdapterFileCache(tmp_path, fetch).path(wrong))
    assert not (tmp_path / wrong).exists() and not [
        p for p in tmp_path.iterdir() if p.name.startswith("tmp-")
    ]


# ---- feedback on a completion still on its way ----------------------------------------------


def test_completion_ids_carry_their_issue_time():
    before = time.time()
    cid = new_completion_id("chatcmpl")
    assert cid.startswith("chatcmpl-") and len(cid) == len("chatcmpl-") + 32
    assert before - 0.01 <= issued_at(cid) <= time.time() + 0.01
    assert issued_at("cmpl-nope") is None and issued_at("cmpl-" + "z" * 32) is None


def test_feedback_waits_for_a_recent_completion_pushed_by_another_process():
    from peftserve.server.canary import CanaryRuntime

    runtime = object.__new__(CanaryRuntime)  # the feedback part alone: windows and the wait
    runtime.windows = MetricWindows()
    runtime.late_completion_s = 2.0
    cid = new_completion_id("cmpl")

    async def scenario() -> tuple[bool, bool, float]:
        async def arrive() -> None:  # the other ingress's push, 0.3 s later
            await asyncio.sleep(0.3)
            runtime.windows.register_completion(cid, _record("v2", 7, "r1", finish_reason="stop"))

        started = time.monotonic()
        pushed = asyncio.ensure_future(arrive())
        late = await runtime.record_feedback(cid, 0.5)
        await pushed
        old = await runtime.record_feedback("cmpl-000000000001" + "0" * 20, 0.5)  # issued in 1970
        return late, old, time.monotonic() - started

    late, old, took = asyncio.run(scenario())
    assert late and not old and took < 1.5


# ---- admin calls forwarded to the controller ------------------------------------------------


def test_a_forwarded_call_reaches_the_controllers_app_whole_and_comes_back_as_it_was():
    from fastapi.testclient import TestClient

    from peftserve.api.errors import install_error_handlers
    from peftserve.server.forward import HttpCall, answer, forward_router

    controller = FastAPI()

    @controller.put("/admin/echo/{name}")
    async def echo(name: str, request: Request) -> dict:
        return {"name": name, "q": request.url.query, "body": (await request.body()).decode(),
                "client": request.client.host, "auth": request.headers.get("authorization")}  # fmt: skip

    async def send(call: HttpCall):
        return await answer(controller, call)

    ingress = FastAPI()
    install_error_handlers(ingress)
    ingress.include_router(forward_router(send, max_body_bytes=16))
    with TestClient(ingress, client=("10.1.2.3", 5555)) as client:
        r = client.put("/admin/echo/x?a=1", content=b"hello", headers={"Authorization": "Bearer t"})
        assert r.status_code == 200
        assert r.json() == {
            "name": "x",
            "q": "a=1",
            "body": "hello",
            "client": "10.1.2.3",
            "auth": "Bearer t",
        }
        assert client.get("/admin/missing").status_code == 404
        too_big = client.put("/admin/echo/x", content=b"x" * 17)
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"


def test_engine_reports_fold_into_one_fleet_view():
    from peftserve.engine.engine import EngineStats
    from peftserve.server.fleet import EngineReport, FleetState, ModelInfo, stats_of

    now = [0.0]
    fleet = FleetState(interval_s=1.0, clock=lambda: now[0])
    info = ModelInfo(64, "cpu", "float32")
    fleet.record(EngineReport("a", EngineStats(steps=3, max_loras_in_step=2), {"reverse@v1": "gpu"},
                              ("reverse",), info, waiting=("reverse@v1",)))  # fmt: skip
    fleet.record(EngineReport("b", EngineStats(steps=4, max_loras_in_step=3), {"reverse@v1": "cpu", "sort@s": "disk"},
                              ("reverse", "sort"), info, waiting=("sort@s", "reverse@v1")))  # fmt: skip
    view = fleet.view()
    assert view.replicas == ("a", "b") and view.tiers == {"reverse@v1": "gpu"}
    assert view.waiting == ("reverse@v1", "sort@s")  # vLLM's waiting_lora_adapters, fleet-wide
    stats = stats_of(view.stats)
    assert stats.steps == 7 and stats.max_loras_in_step == 3 and isinstance(stats.steps, int)
    now[0] = 10.0  # neither reported for 5 intervals: gone
    assert fleet.view().replicas == ()


def test_a_lease_survives_a_restart_of_the_process_that_holds_it():
    with tempfile.TemporaryDirectory() as d:
        first = db.acquire_lease(d, "a")
        db.release_fence(d)
        assert db.acquire_lease(d, "b") == first + 1
        conn = db.connect(d)
        with db.transaction(conn):  # the new holder writes
            conn.execute("CREATE TABLE t (x)")
        conn.close()
        db.release_fence(d)


def test_replaced_outputs_keep_the_original_request_id():
    from peftserve.server.fleet import _as_original

    out = _out("cmpl-1-retry", [5], True, 9, 2)
    fixed = _as_original(out, "cmpl-1", 7, 3)
    assert (fixed.request_id, fixed.prompt_tokens, fixed.completion_tokens) == ("cmpl-1", 7, 5)
    assert _as_original(replace(out, request_id="cmpl-1"), "cmpl-1", 9, 0).completion_tokens == 2


# ---- deploy/ray and the app builder ---------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_the_serve_config_and_the_rayservice_hold_one_valid_application():
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from peftserve.server.ray_app import app_builder

    config = yaml.safe_load((ROOT / "deploy" / "ray" / "peftserve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    service = yaml.safe_load((ROOT / "deploy" / "ray" / "rayservice.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == config
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    assert (module, name) == ("peftserve.server.ray_app", "app_builder")
    assert isinstance(app_builder(app["args"]), Application)
    with pytest.raises(ValueError, match="engine_replica"):
        app_builder({**app["args"], "engine_replica": 3})
    with pytest.raises(ValueError, match="engine_replicas must be at least 1"):
        app_builder({**app["args"], "engine_replicas": 0})


def test_ingress_replicas_export_the_controllers_rollout_series_from_the_snapshot():
    from prometheus_client import CollectorRegistry, generate_latest

    from peftserve.server.link import ControllerLink
    from peftserve.server.ray_app import SnapshotCollector

    controller = CollectorRegistry()
    from prometheus_client import Counter, Gauge

    Gauge("peftserve_canary_weight_ratio", "w", ["task"], registry=controller).labels(
        "reverse"
    ).set(0.25)
    Counter("peftserve_rollout_judgments", "j", ["task", "result"], registry=controller).labels(
        "reverse", "pass"
    ).inc(3)
    text = generate_latest(controller).decode()
    link = ControllerLink(None, ModelTable(base_name="b", base_root="m", max_model_len=8), "i", 1.0)  # type: ignore[arg-type]
    link.install(Snapshot(1, 1, {}, {}, (), rollout_metrics=text))
    ingress = CollectorRegistry()
    ingress.register(SnapshotCollector(link))
    page = generate_latest(ingress).decode()
    assert 'peftserve_canary_weight_ratio{task="reverse"} 0.25' in page
    assert 'peftserve_rollout_judgments_total{result="pass",task="reverse"} 3.0' in page


def test_serve_ray_refuses_bad_settings_and_a_missing_model_before_starting_ray(tmp_path, capsys):
    from peftserve.cli import main

    assert main(["serve", "--ray", "--engine-replicas", "0"]) == 2
    assert "engine_replicas must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--ray", "--model", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "model directory" in err and "does not exist" in err
    import ray

    assert not ray.is_initialized()
