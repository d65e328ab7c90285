"""Rollout controller with a fake clock and fake hooks: no engine, no HTTP.

Traffic is recorded straight into the metric windows (both arms every round) and probes are
answered by a fake hook, so each test runs a whole rollout in well under a second.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from peftserve.canary.controller import (
    LATENCY_PROMPTS,
    ControllerConfig,
    ControllerHooks,
    ProbeAnswer,
    RolloutController,
    RolloutNotFoundError,
)
from peftserve.canary.metrics import MetricWindows
from peftserve.canary.router import Router
from peftserve.canary.samples import BatchShare, RequestRecord, stratum_of, unit_id
from peftserve.canary.spec import (
    AnalysisSpec,
    DecisionPolicy,
    MetricSpec,
    RolloutConflictError,
    RolloutSpec,
    RolloutSpecError,
)
from peftserve.canary.store import RolloutStore
from peftserve.server.model_table import ModelTable

T0 = 1_700_000_000.0
EVAL = [{"prompt": f"reverse {i:03d}", "answer": f"{i:03d}"[::-1]} for i in range(50)]
ERROR_ONLY = AnalysisSpec(metrics=(MetricSpec("error_rate", "proportion", "increase", 0.0, mde=0.05),),
                          min_samples=50)
QUALITY = AnalysisSpec(metrics=(MetricSpec("error_rate", "proportion", "increase", 0.0, mde=0.05),
                                MetricSpec("latency", "continuous", "increase", 0.1, mde=0.3, relative=True),
                                MetricSpec("probe_accuracy", "proportion", "decrease", 0.0, mde=0.2)),
                       min_samples=30)


def _spec(**kw) -> RolloutSpec:
    kw.setdefault("analysis", QUALITY)
    kw.setdefault("steps", (1.0, 5.0, 25.0))
    return RolloutSpec("reverse", kw.pop("stable", "v1"), kw.pop("candidate", "v2"), step_interval_s=60.0, **kw)


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class FakeHooks:
    """The server's side: a registry, loaded adapters, probes answering by rule with step times."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.registry = {"reverse": ["v1", "v2", "v3"], "upper": ["u1", "u2"]}
        self.loaded: set[tuple[str, str]] = {("reverse", "v1"), ("upper", "u1")}
        self.unloads: list[tuple[str, str, float]] = []
        self.stable: dict[str, str] = {}
        self.wrong: dict[str, float] = {}
        """version -> share of probes it answers wrongly."""
        self.slow: dict[str, float] = {}
        """version -> factor on its probes' engine time per step."""
        self.probe_fails: set[str] = set()
        self.set_stable_fails = False
        self.probed: list[tuple[str, str, float]] = []
        self.ended: list[tuple[str, str, str]] = []
        self.rng = np.random.default_rng(0)

    async def versions(self, task: str) -> list[str] | None:
        return self.registry.get(task)

    async def ensure_loaded(self, task: str, version: str) -> None:
        self.loaded.add((task, version))

    async def unload(self, task: str, version: str) -> None:
        self.loaded.discard((task, version))
        self.unloads.append((task, version, self.clock()))

    async def set_stable(self, task: str, version: str) -> None:
        if self.set_stable_fails:
            raise OSError("disk full")
        self.stable[task] = version

    async def probe(self, task: str, version: str, prompt: str, temperature: float) -> ProbeAnswer:
        self.probed.append((version, prompt, temperature))
        if version in self.probe_fails:
            raise RuntimeError("engine overloaded")
        step_s = 10 * 0.02 * self.slow.get(version, 1.0) * float(self.rng.lognormal(0, 0.05))
        record = RequestRecord(task, version, 0, "", 0.0, finish_reason="stop", batch=BatchShare(10, step_s, 40))
        digits = prompt.split()[-1]
        if digits.isdigit() and int(digits) % 10 < 10 * self.wrong.get(version, 0.0):
            return ProbeAnswer("wrong", record)
        return ProbeAnswer(f" {digits[::-1]}\n", record)  # surrounding whitespace does not matter

    async def end(self, task: str, stable: str, candidate: str) -> None:
        self.ended.append((task, stable, candidate))

    def hooks(self) -> ControllerHooks:
        return ControllerHooks(self.versions, self.ensure_loaded, self.unload, self.set_stable, self.probe,
                               self.end)


class World:
    """One server's canary parts on a data directory."""

    def __init__(self, data_dir: Path, clock: Clock | None = None, hooks: FakeHooks | None = None,
                 **config: float) -> None:
        self.clock = clock or Clock()
        self.store = RolloutStore(data_dir, clock=self.clock)
        self.metrics = MetricWindows(clock=self.clock)
        self.router = Router()
        self.router.set_task("reverse", "v1", ["v1", "v2", "v3"])
        self.router.set_task("upper", "u1", ["u1", "u2"])
        self.fake = hooks or FakeHooks(self.clock)
        config.setdefault("probes_per_tick", 50)
        self.controller = RolloutController(self.store, self.metrics, self.router, self.fake.hooks(),
                                            config=ControllerConfig(**config), clock=self.clock)
        self.rng = np.random.default_rng(0)
        self.users = 0

    def traffic(self, task: str = "reverse", n: int = 100, errors: dict[str, float] | None = None) -> None:
        """``n`` new users per arm, one request each; in the shadow phase the candidate's are shadow copies."""
        rollout = self.router.rollout(task)
        errors = errors or {}
        spec = rollout.spec
        stratum = stratum_of(rollout.weight)
        for version, arm in ((spec.stable, "stable"), (spec.candidate, "candidate")):
            for _ in range(n):
                self.users += 1
                failed = bool(self.rng.random() < errors.get(version, 0.0))
                self.metrics.record(RequestRecord(
                    task, version, unit_id(f"user:{self.users}"), stratum, self.clock(), arm=arm, error=failed,
                    e2e=None if failed else float(self.rng.lognormal(0.0, 0.3)), output_tokens=8,
                    finish_reason="error" if failed else "stop"))

    async def round(self, dt: float = 10.0, task: str = "reverse", **traffic) -> None:
        """Advance the clock, send a round of traffic if the task has a rollout, run one tick."""
        self.clock.t += dt
        rollout = self.router.rollout(task)
        if rollout is not None and rollout.state in ("shadow", "ramping"):
            self.traffic(task, **traffic)
        await self.controller.tick()

    def states(self, task: str = "reverse") -> list[tuple[str, float]]:
        return [(e["payload"]["to"], e["payload"]["weight"])
                for e in self.store.history(task, 10_000) if e["kind"] == "state"]


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- automatic rollouts


def test_good_candidate_advances_through_every_step_and_is_promoted(tmp_path):
    w = World(tmp_path, promote_keep_warm_s=600.0)

    async def main():
        rollout = await w.controller.start(_spec(), EVAL)
        assert rollout.state == "ramping" and rollout.weight == 1.0
        assert ("reverse", "v2") in w.fake.loaded and w.router.rollout("reverse") == rollout
        for _ in range(30):
            await w.round()
            if w.router.rollout("reverse") is None:
                break
        promoted_at = w.clock.t
        assert w.states() == [("ramping", 1.0), ("ramping", 5.0), ("ramping", 25.0), ("promoted", 100.0)]
        assert promoted_at == T0 + 180  # 60 s per step: the evidence sufficed, the least time ruled
        assert w.fake.stable == {"reverse": "v2"} and w.router.tasks["reverse"] == "v2"
        assert w.router.route("reverse", user="anyone").version == "v2"
        assert w.fake.ended == [("reverse", "v1", "v2")]  # the server drops its probe twins
        # Greedy probes: each prompt answered once per version for the whole rollout.
        answered = [(v, p) for v, p, _ in w.fake.probed if p.startswith("reverse")]
        assert sorted(answered) == sorted({(v, item["prompt"]) for v in ("v1", "v2") for item in EVAL})

        # The old stable stays warm for instant rollback, then is unloaded.
        await w.round(dt=599.0)
        assert w.fake.unloads == [] and ("reverse", "v1") in w.fake.loaded
        await w.round(dt=1.0)
        assert w.fake.unloads == [("reverse", "v1", promoted_at + 600.0)]

        status = w.controller.status("reverse")
        assert status["state"] == "promoted" and status["weight"] == 100.0 and not status["active"]
        assert status["last_judgment"]["result"] == "pass"
        assert status["last_decision"]["action"] == "promote"
        assert "v1 -> v2 promoted at 100 %" in status["summary"]
        history = w.controller.history("reverse")
        start = history[0]
        assert start["kind"] == "state" and "plan: about" in start["reason"] and start["payload"]["plan"]["steps"]
        decisions = [e for e in history if e["kind"] == "decision"]
        assert [d["action"] for d in decisions if d["action"] != "hold"] == ["advance", "advance", "promote"]
        assert all(d["reason"] for d in decisions)
        judgments = [e for e in history if e["kind"] == "judgment"]
        assert len(judgments) == len(decisions) and all(j["payload"]["metrics"] for j in judgments)
        for m in judgments[-1]["payload"]["metrics"]:  # each names its test, margin and evidence
            assert m["test"] and "tolerance" in m["detail"] and "mde" in m["detail"] and m["status"] == "pass"
        assert history[-1]["kind"] == "unload" and "kept warm" in history[-1]["reason"]
        snap = w.controller.metrics_snapshot()
        assert snap["tasks"]["reverse"]["state"] == "promoted" and snap["tasks"]["reverse"]["weight"] == 100.0
        assert snap["tasks"]["reverse"]["last_progress"] == 1.0
        assert snap["decisions"]["reverse"]["promote"] == 1 and snap["judgments"]["reverse"]["pass"] >= 1
        assert snap["active_rollouts"] == 0 and snap["pending_unloads"] == 0

    run(main())


def test_status_says_what_the_next_decision_waits_for(tmp_path):
    w = World(tmp_path)

    async def main():
        await w.controller.start(_spec(analysis=ERROR_ONLY, steps=(50.0,)), None)
        await w.round(n=20)
        status = w.controller.status("reverse")
        nxt = status["next"]
        assert nxt["action"] == "promote" and not nxt["ready"]
        row = next(m for m in nxt["metrics"] if m["name"] == "error_rate")
        assert row["samples"] == 20 and row["needed"] > 20 and row["time_left_s"] > 0
        assert "next: promote when error_rate 20 of ~" in status["summary"]
        assert status["plan"]["summary"].startswith("about")

    run(main())


def test_critical_error_rate_rolls_back_at_once_and_names_the_metric(tmp_path):
    w = World(tmp_path, rollback_keep_warm_s=60.0)

    async def main():
        await w.controller.start(_spec(), EVAL)
        w.clock.t += 5
        for i in range(40):  # candidate requests that failed (stable answered for them)
            w.metrics.record(RequestRecord("reverse", "v2", unit_id(f"user:x{i}"), "1%", w.clock.t,
                                           arm="candidate", error=True))
        await w.round(dt=5)
        assert w.router.rollout("reverse") is None  # weight 0 at once
        assert all(w.router.route("reverse", user=f"u{i}").version == "v1" for i in range(200))
        assert w.states() == [("ramping", 1.0), ("rolled_back", 0.0)]
        rollback = [e for e in w.controller.history("reverse") if e["kind"] == "decision"][-1]
        assert rollback["action"] == "rollback" and rollback["metric"] == "error_rate"
        assert "critical metric failed" in rollback["reason"] and "error_rate" in rollback["reason"]
        assert "e-process" in rollback["reason"] and "rate ratio <= 1" in rollback["reason"]
        assert w.controller.status("reverse")["last_judgment"]["deciding_metric"] == "error_rate"
        rolled_back_at = w.clock.t
        await w.round(dt=59.0)
        assert w.fake.unloads == []
        await w.round(dt=1.0)
        assert w.fake.unloads == [("reverse", "v2", rolled_back_at + 60.0)]

    run(main())


def test_lower_probe_accuracy_rolls_back(tmp_path):
    w = World(tmp_path)
    w.fake.wrong["v2"] = 0.5

    async def main():
        await w.controller.start(_spec(), EVAL)
        for _ in range(5):
            await w.round()
            if w.router.rollout("reverse") is None:
                break
        assert w.states()[-1] == ("rolled_back", 0.0)
        decision = [e for e in w.controller.history("reverse") if e["kind"] == "decision"][-1]
        assert decision["action"] == "rollback" and decision["metric"] == "probe_accuracy"
        judgment = [e for e in w.controller.history("reverse") if e["kind"] == "judgment"][-1]["payload"]
        probe = next(m for m in judgment["metrics"] if m["name"] == "probe_accuracy")
        assert probe["status"] == "fail" and probe["stable_value"] == 1.0 and probe["candidate_value"] == 0.5
        assert "McNemar" in probe["test"] and probe["lower"] > 0

    run(main())


def test_slower_candidate_is_rolled_back_on_latency(tmp_path):
    w = World(tmp_path)
    w.fake.slow["v2"] = 1.5

    async def main():
        await w.controller.start(_spec(), EVAL)
        for _ in range(5):
            await w.round()
            if w.router.rollout("reverse") is None:
                break
        assert w.states()[-1] == ("rolled_back", 0.0)
        decision = [e for e in w.controller.history("reverse") if e["kind"] == "decision"][-1]
        assert decision["metric"] == "latency" and "twin of stable" in decision["reason"]

    run(main())


def test_without_evidence_it_holds_then_pauses_after_the_limit(tmp_path):
    w = World(tmp_path)
    spec = _spec(analysis=ERROR_ONLY, policy=DecisionPolicy(nodata_pause_s=120.0))

    async def main():
        await w.controller.start(spec, None)
        for _ in range(11):
            await w.round(n=0)  # no traffic, and no probes feed error_rate without an eval set
            assert w.router.rollout("reverse").state == "ramping"
        await w.round(n=0)
        rollout = w.router.rollout("reverse")
        assert rollout.state == "paused" and rollout.weight == 1.0  # pausing moves no user
        decisions = [e for e in w.controller.history("reverse") if e["kind"] == "decision"]
        assert [d["action"] for d in decisions] == ["hold"] * 11 + ["pause"]
        assert "no new sample for 120 s" in decisions[-1]["reason"]
        assert {j["result"] for j in w.controller.history("reverse") if j["kind"] == "judgment"} == {"nodata"}
        start = w.controller.history("reverse")[0]
        assert any("no traffic" in x for x in start["payload"]["plan"]["warnings"])
        n_events = len(w.controller.history("reverse"))
        await w.round()  # paused: neither probed nor judged
        assert len(w.controller.history("reverse")) == n_events

    run(main())


def test_shadow_phase_judges_shadow_copies_then_ramps(tmp_path):
    w = World(tmp_path)

    async def main():
        rollout = await w.controller.start(_spec(shadow_percent=10.0), EVAL)
        assert rollout.state == "shadow" and rollout.weight == 0.0
        await w.round()
        first = [e for e in w.controller.history("reverse") if e["kind"] == "judgment"][0]["payload"]
        errors = next(m for m in first["metrics"] if m["name"] == "error_rate")
        assert errors["n_candidate"] == 150  # 100 shadow copies' users (stratum "shadow") + 50 probe prompts
        for _ in range(6):
            await w.round()
        rollout = w.router.rollout("reverse")
        assert rollout.state == "ramping" and rollout.weight >= 1.0
        assert w.controller.status("reverse")["shadow"]["candidate"] == "v2"

    run(main())


def test_probes_without_an_eval_set_measure_latency_and_sampled_probes_repeat(tmp_path):
    w = World(tmp_path, probes_per_tick=4)
    latency_only = AnalysisSpec(metrics=(MetricSpec("latency", "continuous", "increase", 0.1, mde=0.3,
                                                    relative=True),), min_samples=10)

    async def main():
        await w.controller.start(_spec(analysis=latency_only), None)
        await w.round()
        assert {p for _, p, _ in w.fake.probed} <= set(LATENCY_PROMPTS) and len(w.fake.probed) == 8
        await w.controller.rollback_now("reverse")
        w.fake.probed.clear()
        await w.controller.start(_spec(candidate="v3", probe_temperature=0.8), EVAL[:3])
        for _ in range(3):
            await w.round()
        prompts = [p for v, p, _ in w.fake.probed if v == "v3"]
        assert len(prompts) == 12 and len(set(prompts)) == 3  # cycled: repeated measurements
        assert {t for _, _, t in w.fake.probed} == {0.8}

    run(main())


# --------------------------------------------------------------------------- evaluator errors


def test_judge_and_probe_errors_are_never_failures(tmp_path, monkeypatch):
    w = World(tmp_path)
    w.fake.probe_fails.add("v2")

    async def main():
        await w.controller.start(_spec(), EVAL)
        await w.round()
        errors = [e for e in w.controller.history("reverse") if e["kind"] == "evaluator_error"]
        assert len(errors) == 1 and "50 of 100 probes failed" in errors[0]["reason"]
        assert "v2: RuntimeError: engine overloaded" in errors[0]["reason"]
        assert "not counted against either version" in errors[0]["reason"]
        assert w.router.rollout("reverse").state == "ramping"  # probe_accuracy lacks data: hold
        w.fake.probe_fails.clear()

        def broken(*args, **kwargs):
            raise RuntimeError("metrics backend down")

        monkeypatch.setattr(w.metrics, "evidence", broken)
        for _ in range(3):
            await w.round()
            assert w.router.rollout("reverse").state == "ramping"
        await w.round()  # the fourth error in a row pauses (max_errors_in_row)
        assert w.router.rollout("reverse").state == "paused"
        judgments = [e for e in w.controller.history("reverse") if e["kind"] == "judgment"]
        assert [j["result"] for j in judgments][-4:] == ["error"] * 4
        assert "metrics backend down" in judgments[-1]["reason"]

    run(main())


def test_promotion_waits_until_the_stable_pointer_is_saved(tmp_path):
    w = World(tmp_path)
    w.fake.set_stable_fails = True

    async def main():
        await w.controller.start(_spec(), EVAL)
        for _ in range(24):
            await w.round()
        rollout = w.router.rollout("reverse")
        assert rollout.state == "ramping" and rollout.is_last_step  # promote failed: stays
        assert w.router.tasks["reverse"] == "v1"
        failed = [e for e in w.controller.history("reverse") if e["kind"] == "evaluator_error"]
        assert failed and "promote failed" in failed[-1]["reason"] and "disk full" in failed[-1]["reason"]
        w.fake.set_stable_fails = False
        await w.round()
        assert w.router.rollout("reverse") is None and w.router.tasks["reverse"] == "v2"
        assert w.fake.stable == {"reverse": "v2"}

    run(main())


# --------------------------------------------------------------------------- manual controls


def test_manual_controls(tmp_path):
    w = World(tmp_path, rollback_keep_warm_s=60.0, probes_per_tick=0)
    c = w.controller

    async def main():
        with pytest.raises(RolloutNotFoundError) as e:
            await c.pause("reverse")
        assert e.value.status == 404
        await c.start(_spec(), EVAL)
        await w.round()
        paused = await c.pause("reverse", "checking the dashboards")
        assert paused.state == "paused" and paused.weight == 1.0 and w.router.rollout("reverse") == paused
        with pytest.raises(RolloutConflictError):
            await c.pause("reverse")
        w.clock.t += 30
        resumed = await c.resume("reverse")
        assert resumed.state == "ramping" and resumed.step_started_at == w.clock.t
        with pytest.raises(RolloutConflictError):
            await c.resume("reverse")
        with pytest.raises(RolloutConflictError) as e:
            await c.retry("reverse")  # only a rolled-back rollout can be retried
        assert e.value.status == 409

        await c.rollback_now("reverse", "bad vibes")
        assert w.router.rollout("reverse") is None
        first = w.store.get("reverse")[0]
        w.clock.t += 10
        retried = await c.retry("reverse")
        assert retried.state == "ramping" and retried.weight == 1.0 and w.router.rollout("reverse") == retried
        second = w.store.get("reverse")[0]
        assert second != first and w.store.eval_set(second) == EVAL
        w.clock.t += 120.0
        await c.tick()  # no traffic: holds; the candidate's unload was due 60 s after the rollback
        assert w.fake.unloads == []  # the retry cancelled it

        promoted = await c.promote_now("reverse")
        assert promoted.state == "promoted" and w.router.tasks["reverse"] == "v2"
        assert w.fake.stable == {"reverse": "v2"}
        states = [e for e in c.history("reverse") if e["kind"] == "state"]
        assert [(s["state_to"], s["actor"]) for s in states] == [
            ("ramping", "admin"), ("paused", "admin"), ("ramping", "admin"), ("rolled_back", "admin"),
            ("ramping", "admin"), ("promoted", "admin")]
        assert states[1]["reason"] == "paused by admin; the weight stays: checking the dashboards"
        assert "retry of rollout" in states[4]["reason"]
        assert all(e["time"].endswith("+00:00") for e in states)
        with pytest.raises(RolloutNotFoundError):
            await c.rollback_now("reverse")  # promoted: nothing active any more
        with pytest.raises(RolloutNotFoundError):
            c.status("upper")

    run(main())


@pytest.mark.parametrize("kwargs, eval_set, error, status", [
    ({"candidate": "v9"}, EVAL, "unknown candidate version 'v9'", 400),
    ({"stable": "v0"}, EVAL, "unknown stable version 'v0'", 400),
    ({"stable": "v3"}, EVAL, "stable version of task 'reverse' is 'v1'", 409),
    ({"analysis": AnalysisSpec(metrics=(MetricSpec("bleu", "continuous", "decrease", 0.1),))}, None,
     "unknown metric 'bleu'", 400),
    ({}, None, "judges probe_accuracy but the rollout has no eval set", 400),
    ({}, [], "eval set is empty", 400),
    ({}, [{"prompt": "x"}], "eval set item 0", 400),
    ({}, {"prompt": "x", "answer": "y"}, "must be a list", 400),
])
def test_invalid_starts_are_refused(tmp_path, kwargs, eval_set, error, status):
    w = World(tmp_path)

    async def main():
        with pytest.raises(RolloutSpecError, match=error) as e:
            await w.controller.start(_spec(**kwargs), eval_set)
        assert e.value.status == status
        assert w.store.get("reverse") is None and w.router.rollout("reverse") is None

    run(main())


def test_unknown_task_second_rollout_and_same_versions_are_refused(tmp_path):
    w = World(tmp_path)

    async def main():
        with pytest.raises(RolloutSpecError, match="unknown task 'nope'") as e:
            await w.controller.start(RolloutSpec("nope", "a", "b", analysis=ERROR_ONLY))
        assert e.value.status == 400
        with pytest.raises(RolloutSpecError, match="two versions") as e:
            RolloutSpec("reverse", "v1", "v1")
        assert e.value.status == 400
        await w.controller.start(_spec(), EVAL)
        with pytest.raises(RolloutConflictError, match="already has an active rollout") as e:
            await w.controller.start(_spec(candidate="v3"), EVAL)
        assert e.value.status == 409
        await w.controller.start(RolloutSpec("upper", "u1", "u2", analysis=ERROR_ONLY))  # another task: fine
        no_probes = World(tmp_path / "other")
        no_probes.controller.hooks.probe = None
        with pytest.raises(RolloutSpecError, match="runs no probes"):
            await no_probes.controller.start(_spec(), EVAL)

    run(main())


# --------------------------------------------------------------------------- restart


def test_restart_restores_state_weight_and_history(tmp_path):
    first = World(tmp_path)

    async def before():
        await first.controller.start(_spec(), EVAL)
        await first.controller.start(RolloutSpec("upper", "u1", "u2", analysis=ERROR_ONLY))
        for _ in range(7):
            await first.round()
        await first.controller.pause("upper", "for the night")

    run(before())
    assert first.router.rollout("reverse").weight == 5.0
    expected = {t: first.router.rollout(t) for t in ("reverse", "upper")}
    history = first.controller.history("reverse")
    n_judgments = len([e for e in history if e["kind"] == "judgment"])
    first.store.close()

    # A new process: fresh store, metrics and router on the same data directory.
    clock = Clock()
    clock.t = first.clock.t + 300
    second = World(tmp_path, clock=clock)

    async def after():
        restored = await second.controller.restore()
        assert {r.spec.task: r for r in restored} == expected
        for task in ("reverse", "upper"):
            assert second.router.rollout(task) == expected[task]
        assert second.controller._live["reverse"].judgments == first.controller._live["reverse"].judgments
        again = second.controller.history("reverse")
        assert again[: len(history)] == history and again[-1]["kind"] == "restored"
        assert f"{n_judgments} judgment(s) re-read" in again[-1]["reason"]
        status = second.controller.status("upper")
        assert status["state"] == "paused" and status["weight"] == 1.0
        assert ("reverse", "v2") in second.fake.loaded
        # It goes on from where it was: the window restarts at the restore, then the next step.
        for _ in range(6):
            await second.round()
        assert second.router.rollout("reverse").state == "ramping"
        assert second.router.rollout("reverse").weight == 25.0
        assert second.router.rollout("upper").state == "paused"

    run(after())


def test_restore_skips_a_rollout_whose_task_is_not_served(tmp_path):
    first = World(tmp_path)
    run(first.controller.start(_spec(), EVAL))
    run(first.controller.start(RolloutSpec("upper", "u1", "u2", analysis=ERROR_ONLY)))
    first.store.close()

    second = World(tmp_path)
    del second.fake.registry["upper"]  # its versions were deleted (or another registry)
    second.router = Router()  # a router that never heard of "upper"
    second.router.set_task("reverse", "v1", ["v1", "v2", "v3"])
    second.controller.router = second.router
    restored = run(second.controller.restore())
    assert [r.spec.task for r in restored] == ["reverse"]
    assert "upper" not in second.router.tasks and second.router.rollout("upper") is None
    assert ("upper", "u2") not in second.fake.loaded
    last = second.controller.history("upper")[-1]
    assert last["kind"] == "restore_skipped" and "u1, u2" in last["reason"]

    # /v1/models survives a routed task without served versions (a phantom from before the fix).
    table = ModelTable("base", "/models/base", 64, router=second.router)
    table.add_version("reverse", "v1", "/a/v1")
    table.router.set_rollout(first.router.rollout("upper"))
    assert [c.id for c in table.cards()] == ["base", "reverse", "reverse@v1"]


# --------------------------------------------------------------------------- odds and ends


def test_feedback_for_an_unknown_completion_is_refused(tmp_path):
    w = World(tmp_path)
    assert w.controller.metrics.record_feedback("cmpl-unknown", 1.0) is False
    w.metrics.register_completion("cmpl-1", RequestRecord("reverse", "v2", 1, "5%", T0, arm="candidate"))
    assert w.controller.metrics.record_feedback("cmpl-1", 0.5) is True


def test_run_loop_ticks_until_stopped_and_survives_a_failed_round(tmp_path):
    """run() rounds until stop(), a round that raises included; synchronised on the rounds
    themselves (an event set by the fourth), not on a sleep."""
    w = World(tmp_path, interval_s=0.01)
    real_tick, rounds = w.controller.tick, []

    async def main():
        fourth = asyncio.Event()

        async def tick():
            rounds.append(w.clock())
            if len(rounds) == 1:
                raise RuntimeError("a round that fails")
            await real_tick()
            if len(rounds) == 4:
                fourth.set()

        w.controller.tick = tick
        await w.controller.start(_spec(analysis=ERROR_ONLY))
        task = asyncio.create_task(w.controller.run())
        await asyncio.wait_for(fourth.wait(), timeout=60)
        w.controller.stop()
        await asyncio.wait_for(task, timeout=60)
        assert len(rounds) == 4  # stop() ends the loop after the round in progress
        judgments = [e for e in w.controller.history("reverse") if e["kind"] == "judgment"]
        assert len(judgments) == 3  # rounds 2-4; the failed one judged nothing and did not end the loop

    run(main())
