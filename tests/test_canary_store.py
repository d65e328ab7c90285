"""Rollout store: round trips, one active rollout per task, append-only history, crash safety."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from peftserve.canary.controller import ControllerHooks, RolloutController
from peftserve.canary.judge import Judgment, MetricResult
from peftserve.canary.metrics import MetricWindows
from peftserve.canary.router import Router
from peftserve.canary.spec import Rollout, RolloutConflictError, RolloutSpec
from peftserve.canary.store import Event, RolloutStore, ensure_schema
from peftserve.registry import connect
from peftserve.registry.db import SCHEMA_VERSION

REPO = Path(__file__).resolve().parent.parent
SPEC = RolloutSpec("reverse", "v1", "v2", steps=(1.0, 5.0, 25.0))
EVAL = [{"prompt": "abc", "answer": "cba"}, {"prompt": "xy", "answer": "yx", "id": 7}]


def _judgment(at: float) -> Judgment:
    m = MetricResult("error_rate", "fail", "exact conditional-binomial e-process", n_stable=300, n_candidate=310,
                     stable_value=0.0, candidate_value=0.2, harm=0.2, lower=0.15, upper=0.25, mde=0.02,
                     evalue=1e6, detail="error_rate: 0 -> 0.2; fail")
    return Judgment("fail", "fail: critical metric(s) error_rate failed", (m,), at, 610.0)


def test_create_update_get_history_round_trip(tmp_path):
    with RolloutStore(tmp_path) as store:
        r = Rollout.start(SPEC, 100.0)
        rid = store.create(r, EVAL, [Event("state", {"from": None, "to": "ramping", "actor": "admin",
                                                      "reason": "started"}, 100.0)])
        assert store.get("reverse") == (rid, r) and store.active() == [(rid, r)]
        assert store.eval_set(rid) == EVAL
        r2 = r.apply("advance", 160.0)
        store.update(rid, r2, [Event("judgment", _judgment(160.0).to_dict(), 160.0),
                               Event("state", {"from": "ramping", "to": "ramping", "weight": 5.0,
                                               "actor": "controller", "reason": "step passed"}, 160.0)])
        store.append_event(rid, "decision", {"action": "hold", "reason": "waiting", "actor": "controller"}, 170.0)
        assert store.by_id(rid) == r2 and store.get("reverse") == (rid, r2)
        events = store.history("reverse", 10)
        assert [e["kind"] for e in events] == ["state", "judgment", "state", "decision"]
        assert [e["at"] for e in events] == [100.0, 160.0, 160.0, 170.0]
        assert events[2]["actor"] == "controller" and events[2]["reason"] == "step passed"
        assert events[1]["payload"]["metrics"][0]["lower"] == 0.15 and events[1]["payload"]["metrics"][0]["evalue"] == 1e6
        assert [e["kind"] for e in store.history("reverse", 2)] == ["state", "decision"]  # the latest two
        assert [e["kind"] for e in store.history("reverse", 10, kinds=["decision"])] == ["decision"]
        assert store.judgments(rid) == [_judgment(160.0)]
        assert store.get("other") is None and store.history("other") == []
    with RolloutStore(tmp_path) as store:  # reopened: all there
        assert store.get("reverse") == (rid, r2) and len(store.history("reverse")) == 4


def test_one_active_rollout_per_task(tmp_path):
    with RolloutStore(tmp_path) as store:
        rid = store.create(Rollout.start(SPEC, 1.0))
        with pytest.raises(RolloutConflictError):
            store.create(Rollout.start(SPEC, 2.0))
        store.create(Rollout.start(replace(SPEC, task="other"), 2.0))  # another task is fine
        store.update(rid, Rollout.start(SPEC, 1.0).apply("rollback", 3.0))
        rid2 = store.create(Rollout.start(SPEC, 4.0), retry_of=rid)
        assert store.get("reverse")[0] == rid2
        assert sorted(r.spec.task for _, r in store.active()) == ["other", "reverse"]


def test_history_is_append_only_and_writes_are_atomic(tmp_path):
    with RolloutStore(tmp_path) as store:
        r = Rollout.start(SPEC, 1.0)
        rid = store.create(r, None, [Event("state", {"to": "ramping"}, 1.0)])
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            store._conn.execute("UPDATE canary_events SET reason = 'x'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            store._conn.execute("DELETE FROM canary_events")
        with pytest.raises(ValueError):  # the second event is invalid: nothing of the update is written
            store.update(rid, r.apply("pause", 2.0), [Event("state", {"to": "paused"}, 2.0), Event("", {})])
        assert store.get("reverse")[1].state == "ramping" and len(store.history("reverse")) == 1
        with pytest.raises(KeyError):
            store.update(999, r)
        with pytest.raises(KeyError):
            store.append_event(999, "x", {})


def test_schema_lives_beside_the_registry(tmp_path):
    RolloutStore(tmp_path).close()
    conn = connect(tmp_path)
    ensure_schema(conn)  # idempotent
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"adapters", "task_stable", "canary_rollouts", "canary_events"} <= tables
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION  # registry migrations untouched
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


# --------------------------------------------------------------------------- crash safety

_CRASH_CHILD = r"""
import asyncio, sys
from pathlib import Path
from peftserve.canary.controller import ControllerHooks, RolloutController
from peftserve.canary.metrics import MetricWindows
from peftserve.canary.router import Router
from peftserve.canary.spec import AnalysisSpec, MetricSpec, RolloutSpec
from peftserve.canary.store import RolloutStore

data_dir, marker = sys.argv[1:]
clock = [1000.0]
async def versions(task): return ["v1", "v2"]
async def nothing(*args): return None
router = Router()
router.set_task("reverse", "v1", ["v1", "v2"])
store = RolloutStore(data_dir, clock=lambda: clock[0])
controller = RolloutController(store, MetricWindows(), router, ControllerHooks(versions, nothing, nothing, nothing),
                               clock=lambda: clock[0])
spec = RolloutSpec("reverse", "v1", "v2", steps=(1.0, 5.0),
                   analysis=AnalysisSpec(metrics=(MetricSpec("error_rate", "proportion", "increase", 0.01),)))

async def main():
    await controller.start(spec)
    n = 1  # state events committed
    while True:
        for action in ("pause", "resume", "rollback_now", "retry"):
            clock[0] += 1
            await getattr(controller, action)("reverse")
            n += 1
            print(n, flush=True)
            if n == 40:
                Path(marker).touch()

asyncio.run(main())
"""


def test_sigkill_mid_transition_keeps_state_weight_and_history(tmp_path):
    """A child cycles pause / resume / rollback / retry as fast as it can and is killed mid-way."""
    data, marker = tmp_path / "data", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "child.out", "wb") as out, open(tmp_path / "child.err", "wb") as err:
        child = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, str(data), str(marker)], cwd=REPO, env=env,
                                 stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, (tmp_path / "child.err").read_text()
            assert time.monotonic() < deadline, "the child never reached the crash point"
            time.sleep(0.02)
        time.sleep(0.3)  # keep writing for a while, then kill at an arbitrary point
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    printed = int((tmp_path / "child.out").read_text().split()[-1])
    assert printed >= 40

    with RolloutStore(data) as store:
        events = store.history("reverse", 1_000_000, kinds=["state"])
        # Every transition the child reported is there; at most one more was committed unreported.
        assert printed <= len(events) <= printed + 1
        rows = store._conn.execute("SELECT id, state, weight FROM canary_rollouts ORDER BY id").fetchall()
        for row in rows:  # each rollout is in the state its last state event says
            last = [e for e in events if e["rollout_id"] == row["id"]][-1]["payload"]
            assert (row["state"], row["weight"]) == (last["to"], last["weight"])
        assert len(store.active()) <= 1
        assert all(row["state"] == "rolled_back" for row in rows[:-1])
        last_id, last = store.get("reverse")
        assert last_id == rows[-1]["id"] and last.state == rows[-1]["state"]

        # A restarted controller routes exactly as the store says.
        async def versions(task):
            return ["v1", "v2"]

        async def nothing(*args):
            return None

        router = Router()
        router.set_task("reverse", "v1", ["v1", "v2"])
        controller = RolloutController(store, MetricWindows(), router,
                                       ControllerHooks(versions, nothing, nothing, nothing))
        restored = asyncio.run(controller.restore())
        if last.active:
            assert restored == [last] and router.rollout("reverse") == last
            assert controller.status("reverse")["weight"] == last.weight
        else:
            assert restored == [] and router.rollout("reverse") is None
