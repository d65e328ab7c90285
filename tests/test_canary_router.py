"""Canary router (hash split, pins, overrides, targeting, shadow) and rollout specs/state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peftserve.canary.router import (
    BUCKETS,
    RouteDecision,
    Router,
    RoutingError,
    bucket,
    parse_model,
    shadow_bucket,
)
from peftserve.canary.spec import (
    DEFAULT_STEPS,
    AnalysisSpec,
    MetricSpec,
    Rollout,
    RolloutConflictError,
    RolloutSpec,
    RolloutSpecError,
    TargetingRule,
    check_registry,
)

N_USERS = 100_000
REPO = Path(__file__).resolve().parent.parent


def _users(seed: int = 0, n: int = N_USERS) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"user-{v:016x}" for v in rng.integers(0, 2**63, n)]


def _router(spec: RolloutSpec | None = None, step: int = 0, state: str = "ramping") -> Router:
    r = Router()
    r.set_task("reverse", "v1", versions=["v0", "v1", "v2"])
    r.set_task("upper", "u1")
    if spec is not None:
        r.set_rollout(Rollout(spec, state, step, 0.0, 0.0, 0.0))
    return r


SPEC = RolloutSpec("reverse", "v1", "v2")


# --------------------------------------------------------------------------- hash split


def test_canary_share_matches_each_weight_and_never_moves_users_back():
    users = _users()
    previous: set[str] = set()
    for step, weight in enumerate(DEFAULT_STEPS):
        router = _router(SPEC, step=step)
        on_candidate = set()
        for u in users:
            d = router.route("reverse", user=u, request_id="r")
            assert d.reason == "hash" and d.in_experiment
            if d.arm == "candidate":
                assert d.version == "v2" and d.bucket < weight * 100
                on_candidate.add(u)
            else:
                assert d.version == "v1"
        share = 100 * len(on_candidate) / len(users)
        assert abs(share - weight) <= 0.5, (weight, share)
        assert previous <= on_candidate  # everyone on the candidate stays there at a higher weight
        previous = on_candidate


def test_bucket_is_uniform_and_task_specific():
    users = _users(seed=1, n=50_000)
    b = np.array([bucket("reverse", u) for u in users])
    counts = np.bincount(b // 1000, minlength=10)  # ten deciles of 5,000 expected each
    assert counts.min() > 4_700 and counts.max() < 5_300
    other = np.array([bucket("upper", u) for u in users])
    assert abs(np.corrcoef(b, other)[0, 1]) < 0.02  # tasks are split independently
    assert b.min() >= 0 and b.max() < BUCKETS


def test_bucket_is_stable_across_processes():
    keys = ["user:alice", "session:s-1", "request:req-42"]
    here = [bucket("reverse", k) for k in keys] + [shadow_bucket("reverse", k) for k in keys]
    code = (
        "from peftserve.canary.router import bucket, shadow_bucket\n"
        f"keys = {keys!r}\n"
        "print([bucket('reverse', k) for k in keys] + [shadow_bucket('reverse', k) for k in keys])"
    )
    for seed in ("1", "2"):  # Python's hash() would differ between these
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)})
        assert json.loads(out.stdout) == here
    # Golden value: cohorts must not move when the code changes (a user would switch versions).
    assert bucket("reverse", "user:alice") == 6296  # blake2b-64("reverse\x1fuser:alice") % 10000


def test_routing_key_precedence_and_header_case():
    router = _router(RolloutSpec("reverse", "v1", "v2", steps=(50.0,)))
    by_user = router.route("reverse", user="alice", headers={"X-Session-Id": "s1"}, request_id="r1")
    assert by_user.bucket == bucket("reverse", "user:alice")
    by_session = router.route("reverse", headers={"x-session-id": "s1"}, request_id="r1")
    assert by_session.bucket == bucket("reverse", "session:s1")
    assert router.route("reverse", headers={"X-SESSION-ID": "s1"}, request_id="r2").bucket == by_session.bucket
    by_request = router.route("reverse", request_id="r1")
    assert by_request.bucket == bucket("reverse", "request:r1")
    # a session keeps one version across its requests
    versions = {router.route("reverse", headers={"X-Session-Id": "s7"}, request_id=f"r{i}").version
                for i in range(50)}
    assert len(versions) == 1
    with pytest.raises(RoutingError):
        router.route("reverse")  # nothing to hash


# --------------------------------------------------------------------------- pins


def test_parse_model():
    assert parse_model("reverse") == ("reverse", None)
    assert parse_model("reverse@v2") == ("reverse", "v2")
    for bad in ("", "@v1", "reverse@", "a@b@c"):
        with pytest.raises(RoutingError):
            parse_model(bad)


def test_pins_come_first():
    router = _router(SPEC, step=0)
    d = router.route("reverse@v2", user="alice", headers={"X-Canary": "never"}, is_admin=True)
    assert (d.version, d.arm, d.reason, d.shadow) == ("v2", "candidate", "pin", False)
    assert not d.in_experiment
    d = router.route("reverse@v0", user="alice")
    assert (d.version, d.arm, d.reason) == ("v0", "stable", "pin")
    d = _router().route("reverse@v1", request_id="r")  # no rollout: pins still work
    assert (d.version, d.reason) == ("v1", "pin")
    with pytest.raises(RoutingError) as err:
        router.route("reverse@v9", user="alice")
    assert err.value.status == 404
    with pytest.raises(RoutingError) as err:
        router.route("nosuchtask", user="alice")
    assert err.value.status == 404


# --------------------------------------------------------------------------- overrides


def _user_in(router: Router, arm: str) -> str:
    return next(u for u in _users(seed=2, n=5000) if router.route("reverse", user=u).arm == arm)


def test_override_only_for_admins():
    router = _router(SPEC, step=0)  # 1 %
    stable_user, canary_user = _user_in(router, "stable"), _user_in(router, "candidate")
    d = router.route("reverse", user=stable_user, headers={"X-Canary": "always"}, is_admin=True)
    assert (d.version, d.arm, d.reason) == ("v2", "candidate", "override")
    d = router.route("reverse", user=canary_user, headers={"x-canary": " Never "}, is_admin=True)
    assert (d.version, d.arm, d.reason) == ("v1", "stable", "override")
    # not an admin: the header is ignored, the hash decides
    d = router.route("reverse", user=stable_user, headers={"X-Canary": "always"}, is_admin=False)
    assert (d.arm, d.reason) == ("stable", "hash")
    d = router.route("reverse", user=canary_user, headers={"X-Canary": "never"})
    assert (d.arm, d.reason) == ("candidate", "hash")
    # an admin's typo is an error, not a silent default; a non-admin's is ignored
    with pytest.raises(RoutingError) as err:
        router.route("reverse", user=stable_user, headers={"X-Canary": "sometimes"}, is_admin=True)
    assert err.value.status == 400
    assert router.route("reverse", user=stable_user, headers={"X-Canary": "sometimes"}).reason == "hash"
    # without a rollout there is nothing to override
    d = _router().route("reverse", user=stable_user, headers={"X-Canary": "always"}, is_admin=True)
    assert (d.version, d.reason) == ("v1", "no_rollout")


# --------------------------------------------------------------------------- targeting


def test_targeting_restricts_the_cohort():
    spec = RolloutSpec("reverse", "v1", "v2", steps=(50.0,), shadow_percent=100.0,
                       targeting=(TargetingRule("X-Tier", ("internal",), "equals"),))
    router = _router(spec, step=0)
    users = _users(seed=3, n=2000)
    outside = [router.route("reverse", user=u, headers={"x-tier": "free"}) for u in users]
    assert all((d.arm, d.reason, d.shadow) == ("stable", "targeting", False) for d in outside)
    assert all(router.route("reverse", user=u).reason == "targeting" for u in users[:100])  # no header
    inside = [router.route("reverse", user=u, headers={"X-TIER": " internal "}) for u in users]
    assert all(d.reason == "hash" for d in inside)
    share = sum(d.arm == "candidate" for d in inside) / len(inside)
    assert 0.45 < share < 0.55
    assert all(d.shadow for d in inside if d.arm == "stable")  # shadow_percent 100 within the cohort


def test_targeting_in_and_all_rules_must_match():
    spec = RolloutSpec("reverse", "v1", "v2", steps=(50.0,), targeting=(
        TargetingRule("x-tier", ("internal", "beta")),
        TargetingRule("x-region", ("eu",), "equals"),
    ))
    router = _router(spec, step=0)
    ok = {"X-Tier": "beta", "X-Region": "eu"}
    assert router.route("reverse", user="a", headers=ok).reason == "hash"
    assert router.route("reverse", user="a", headers={**ok, "X-Region": "us"}).reason == "targeting"
    assert router.route("reverse", user="a", headers={"X-Tier": "internal"}).reason == "targeting"
    assert router.route("reverse", user="a", headers={**ok, "X-Tier": "Internal"}).reason == "targeting"  # values exact
    # an admin override still reaches the candidate outside the cohort
    d = router.route("reverse", user="a", headers={"X-Canary": "always"}, is_admin=True)
    assert (d.arm, d.reason) == ("candidate", "override")


def test_targeting_rule_validation_and_json():
    with pytest.raises(RolloutSpecError):
        TargetingRule("x-tier", ("a", "b"), "equals")
    with pytest.raises(RolloutSpecError):
        TargetingRule("x-tier", ())
    with pytest.raises(RolloutSpecError):
        TargetingRule("x-tier: internal", ("a",))
    with pytest.raises(RolloutSpecError):
        TargetingRule("x-tier", ("a",), "regex")
    rule = TargetingRule("X-Tier", ["internal", "beta"])
    assert rule.header == "x-tier" and rule.values == ("internal", "beta")
    assert TargetingRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


# --------------------------------------------------------------------------- shadow and states


def test_shadow_phase_copies_a_share_of_traffic():
    spec = RolloutSpec("reverse", "v1", "v2", shadow_percent=10.0)
    rollout = Rollout.start(spec, 0.0)
    assert rollout.state == "shadow" and rollout.weight == 0.0
    router = _router()
    router.set_rollout(rollout)
    ds = [router.route("reverse", user=u) for u in _users(seed=4)]
    assert all(d.version == "v1" and d.arm == "stable" and d.reason == "hash" for d in ds)
    shadow = [d for d in ds if d.shadow]
    assert abs(100 * len(shadow) / len(ds) - 10.0) <= 0.5
    assert all(d.shadow_version == "v2" for d in shadow)
    assert all(d.shadow_version is None for d in ds if not d.shadow)


def test_shadow_hash_is_independent_of_routing_hash():
    spec = RolloutSpec("reverse", "v1", "v2", steps=(50.0,), shadow_percent=10.0)
    router = _router(spec, step=0)
    ds = [router.route("reverse", user=u) for u in _users(seed=5)]
    assert not any(d.shadow for d in ds if d.arm == "candidate")  # copies are of stable requests
    near = [d.shadow for d in ds if 5000 <= d.bucket < 6000]  # the users the next step would move
    far = [d.shadow for d in ds if d.bucket >= 9000]
    assert abs(np.mean(near) - 0.10) < 0.02 and abs(np.mean(far) - 0.10) < 0.02


def test_router_follows_rollout_states():
    router = _router(SPEC, step=2)  # 10 %
    canary_user = _user_in(router, "candidate")
    paused = Rollout(SPEC, "paused", 2, 0.0, 0.0, 0.0)
    router.set_rollout(paused)
    assert router.route("reverse", user=canary_user).version == "v2"  # pausing moves nobody
    router.set_rollout(paused.apply("promote", 10.0))
    d = router.route("reverse", user="anyone")
    assert (d.version, d.reason) == ("v2", "no_rollout")
    assert router.tasks["reverse"] == "v2" and router.rollout("reverse") is None
    router = _router(SPEC, step=2)
    router.set_rollout(Rollout(SPEC, "ramping", 2, 0.0, 0.0, 0.0).apply("rollback", 10.0))
    assert router.route("reverse", user=canary_user).version == "v1"
    assert router.route("reverse@v2", user=canary_user).version == "v2"  # still pinnable
    assert router.route("upper", user="x") == RouteDecision("upper", "u1", "stable", "no_rollout", False,
                                                            bucket("upper", "user:x"))


# --------------------------------------------------------------------------- rollout specs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"candidate": "v1"}, "two versions"),
        ({"steps": (5.0, 1.0)}, "increasing"),
        ({"steps": (5.0, 5.0)}, "increasing"),
        ({"steps": (50.0, 150.0)}, "100"),
        ({"steps": (50.0, 100.0)}, "100"),
        ({"steps": (0.0, 5.0)}, "> 0"),
        ({"steps": ()}, "at least one"),
        ({"steps": (0.001,)}, "resolution"),
        ({"steps": "1,5"}, "list"),
        ({"steps": (True,)}, "number"),
        ({"task": "re@verse"}, "@"),
        ({"stable": ""}, "non-empty"),
        ({"step_interval_s": 0}, "step_interval_s"),
        ({"shadow_percent": 101}, "shadow_percent"),
    ],
)
def test_rollout_spec_refuses_invalid(kwargs, match):
    base = {"task": "reverse", "stable": "v1", "candidate": "v2"}
    with pytest.raises(RolloutSpecError, match=match) as err:
        RolloutSpec(**{**base, **kwargs})
    assert isinstance(err.value, ValueError) and err.value.status == 400 and err.value.reason


def test_rollout_spec_json_round_trip_and_refusals():
    spec = RolloutSpec(
        "reverse", "v1", "v2", steps=(2.5, 20.0), step_interval_s=120.0, shadow_percent=5.0,
        targeting=(TargetingRule("x-tier", ("internal",), "equals"),),
        analysis=AnalysisSpec(metrics=(MetricSpec("latency_e2e", "continuous", "increase", 0.1, relative=True),)),
    )
    assert RolloutSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert RolloutSpec.from_dict({"task": "reverse", "stable": "v1", "candidate": "v2"}).steps == DEFAULT_STEPS
    with pytest.raises(RolloutSpecError, match="unknown field"):
        RolloutSpec.from_dict({"task": "reverse", "stable": "v1", "candidate": "v2", "weights": [1]})
    with pytest.raises(RolloutSpecError, match="missing"):
        RolloutSpec.from_dict({"task": "reverse", "stable": "v1"})
    with pytest.raises(RolloutSpecError, match="JSON object"):
        RolloutSpec.from_dict(["reverse"])
    rollout = Rollout.start(spec, 100.0).apply("advance", 200.0)
    again = Rollout.from_dict(json.loads(json.dumps(rollout.to_dict())))
    assert again == rollout and again.weight == 2.5
    with pytest.raises(RolloutSpecError, match="weight"):
        Rollout.from_dict({**rollout.to_dict(), "weight": 50.0})


def test_check_registry():
    check_registry(SPEC, {"v1", "v2"})
    with pytest.raises(RolloutSpecError, match="unknown task") as err:
        check_registry(SPEC, None)
    assert err.value.status == 400
    with pytest.raises(RolloutSpecError, match="candidate version 'v2'"):
        check_registry(SPEC, {"v1"})
    with pytest.raises(RolloutConflictError, match="already has an active rollout") as err:
        check_registry(SPEC, {"v1", "v2"}, active=RolloutSpec("reverse", "v1", "v3"))
    assert err.value.status == 409 and isinstance(err.value, ValueError)


def test_rollout_transitions():
    r = Rollout.start(SPEC, 0.0)
    assert (r.state, r.step_index, r.weight) == ("ramping", 0, 1.0)
    r = r.apply("advance", 60.0)
    assert (r.step_index, r.weight, r.step_started_at) == (1, 5.0, 60.0)
    p = r.apply("pause", 70.0)
    assert (p.state, p.weight) == ("paused", 5.0)  # weight kept
    with pytest.raises(RolloutConflictError):
        p.apply("advance", 80.0)
    resumed = p.apply("resume", 90.0)
    assert (resumed.state, resumed.step_index, resumed.step_started_at) == ("ramping", 1, 90.0)
    last = Rollout(SPEC, "ramping", len(SPEC.steps) - 1, 0.0, 0.0, 0.0)
    with pytest.raises(RolloutConflictError, match="promote"):
        last.apply("advance", 1.0)
    done = last.apply("promote", 1.0)
    assert (done.state, done.weight, done.active) == ("promoted", 100.0, False)
    for action in ("advance", "pause", "resume", "promote", "rollback"):
        with pytest.raises(RolloutConflictError):
            done.apply(action, 2.0)
    back = resumed.apply("rollback", 100.0)
    assert (back.state, back.weight) == ("rolled_back", 0.0)
    shadow = Rollout.start(RolloutSpec("reverse", "v1", "v2", shadow_percent=5.0), 0.0)
    with pytest.raises(RolloutConflictError):
        shadow.apply("promote", 1.0)
    assert shadow.apply("pause", 1.0).apply("resume", 2.0).state == "shadow"
    assert shadow.apply("advance", 1.0).weight == 1.0
    with pytest.raises(RolloutSpecError):
        shadow.apply("jump", 1.0)
    with pytest.raises(RolloutSpecError):
        Rollout(SPEC, "ramping", -1, 0.0, 0.0, 0.0)
