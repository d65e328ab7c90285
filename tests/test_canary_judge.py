"""The judge on recorded evidence (each metric's test, margin and evidence), the decision rule, and
the analysis specs. Traffic goes through the real metric windows; no controller, no clock."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from peftserve.canary.judge import (
    Decision,
    Judgment,
    MetricResult,
    decide,
    judge,
    ladder,
    step_ready,
)
from peftserve.canary.metrics import MetricWindows
from peftserve.canary.samples import BatchShare, ProbeRecord, RequestRecord, unit_id
from peftserve.canary.spec import (
    AnalysisSpec,
    DecisionPolicy,
    MetricSpec,
    Rollout,
    RolloutSpec,
    RolloutSpecError,
    default_metrics,
)

ERR = MetricSpec("error_rate", "proportion", "increase", 0.0, mde=0.02)
FB = MetricSpec("feedback_score", "continuous", "decrease", 0.0, mde=0.05)
LAT = MetricSpec("latency", "continuous", "increase", 0.1, mde=0.25, relative=True)
ACC = MetricSpec("probe_accuracy", "proportion", "decrease", 0.0, mde=0.05)


def traffic(w: MetricWindows, rng: np.random.Generator, n: int, *, error: dict[str, float] | None = None,
            feedback: dict[str, float] | None = None, users: int = 5000, weight: float = 50.0,
            segment: dict[str, float] | None = None) -> None:
    """``n`` requests split at ``weight`` % by user; per version error rate and feedback mean;
    ``segment``: the feedback mean of region r0's users (10 %) per version."""
    error, feedback, segment = error or {}, feedback or {}, segment or {}
    for _ in range(n):
        u = int(rng.integers(users))
        version = "v2" if u % 100 < weight else "v1"
        region = f"meta:region=r{u % 10}"
        r = RequestRecord("t", version, unit_id(f"user:{u}"), f"{weight:g}%", 0.0,
                          arm="candidate" if version == "v2" else "stable",
                          error=bool(rng.random() < error.get(version, 0.005)), finish_reason="stop",
                          e2e=0.1, segments=(region,))
        w.record(r)
        if not r.error:
            mean = segment.get(version) if region.endswith("r0") and version in segment else feedback.get(version, 0.8)
            w.register_completion(f"c{_counter()}", r)
            w.record_feedback(f"c{_counter.n}", bool(rng.random() < mean))


def _counter() -> int:
    _counter.n += 1
    return _counter.n


_counter.n = 0


def probes(w: MetricWindows, rng: np.random.Generator, n: int, *, right: dict[str, float] | None = None,
           step_ms: dict[str, float] | None = None, agree: float = 0.7) -> None:
    right, step_ms = right or {}, step_ms or {}
    for i in range(n):
        s_ok = rng.random() < right.get("v1", 0.8)
        c_ok = s_ok if rng.random() < agree else rng.random() < right.get("v2", 0.8)
        for version, ok in (("v1", s_ok), ("v2", c_ok)):
            steps = 10
            step_s = steps * step_ms.get(version, 20.0) / 1000 * float(rng.lognormal(0, 0.1))
            req = RequestRecord("t", version, 0, "probe", 0.0, finish_reason="stop",
                                batch=BatchShare(steps, step_s, 40))
            w.record_probe(ProbeRecord("t", version, i, 1.0 if ok else 0.0, 0.0, req))


def evidence(w: MetricWindows):
    return w.evidence("t", "v1", "v2")


def by_name(j: Judgment, name: str, segment: str = "") -> MetricResult:
    return next(m for m in j.metrics if m.name == name and m.segment == segment)


# --------------------------------------------------------------------------- judge


def test_identical_arms_pass_and_each_result_names_test_margin_and_evidence():
    w, rng = MetricWindows(), np.random.default_rng(0)
    traffic(w, rng, 6000)
    probes(w, rng, 600)
    j = judge(AnalysisSpec(metrics=(ERR, FB, LAT, ACC)), evidence(w), at=5.0)
    assert j.result == "pass", j.reason
    for m in j.metrics:
        assert "tolerance" in m.detail and "mde" in m.detail and m.test in m.detail
        if m.segment:
            assert m.status in ("pending", "suspect")  # segments only ever fail
            continue
        assert m.status == "pass" and m.lower <= m.tolerance and m.upper < m.mde
        assert "tolerance" in m.detail and "mde" in m.detail and m.test in m.detail
    assert "e-process" in by_name(j, "error_rate").test
    assert "twin" in by_name(j, "latency").test and "McNemar" in by_name(j, "probe_accuracy").test
    again = Judgment.from_dict(json.loads(json.dumps(j.to_dict())))
    assert again == j and again.progress == 1.0


def test_a_few_units_are_nodata_never_a_failure():
    w, rng = MetricWindows(), np.random.default_rng(1)
    traffic(w, rng, 40, feedback={"v2": 0.2})
    j = judge(AnalysisSpec(metrics=(FB,)), evidence(w))
    assert by_name(j, "feedback_score").status == "nodata" and j.result != "fail"


def test_more_errors_fail_on_the_exact_test_and_name_it():
    w, rng = MetricWindows(), np.random.default_rng(2)
    traffic(w, rng, 4000, error={"v2": 0.04})
    j = judge(AnalysisSpec(metrics=(ERR,)), evidence(w))
    m = by_name(j, "error_rate")
    assert j.result == "fail" and m.status == "fail" and m.evalue >= 1 / m.alpha
    assert "error_rate failed" in j.reason and "rate ratio <= 1" in j.reason and "e-value" in j.reason
    assert j.failed_critical == ("error_rate",)


def test_a_relative_tolerance_accepts_errors_up_to_it():
    rel = MetricSpec("error_rate", "proportion", "increase", 0.5, mde=1.0, relative=True)
    w, rng = MetricWindows(), np.random.default_rng(3)
    traffic(w, rng, 20000, error={"v1": 0.02, "v2": 0.03})  # 1.5 x: at the tolerance
    assert by_name(judge(AnalysisSpec(metrics=(rel,)), evidence(w)), "error_rate").status != "fail"
    traffic(w, rng, 20000, error={"v1": 0.02, "v2": 0.08})
    m = by_name(judge(AnalysisSpec(metrics=(rel,)), evidence(w)), "error_rate")
    assert m.status == "fail" and "rate ratio <= 1.5" in m.test


def test_zero_means_zero_only_when_asked():
    equal = MetricSpec("non_finite", "proportion", "increase", 0.0, mde=0.01)
    zero = MetricSpec("non_finite", "proportion", "increase", 0.0, baseline="none")
    w = MetricWindows()
    for i in range(400):
        for version in ("v1", "v2"):
            w.record(RequestRecord("t", version, unit_id(f"user:{version}{i}"), "50%", 0.0,
                                   non_finite=i == 7, finish_reason="stop"))
    assert by_name(judge(AnalysisSpec(metrics=(equal,)), evidence(w)), "non_finite").status != "fail"
    m = by_name(judge(AnalysisSpec(metrics=(zero,)), evidence(w)), "non_finite")
    assert m.status == "fail" and "any event fails" in m.test


def test_binary_and_graded_feedback_drops_fail():
    w, rng = MetricWindows(), np.random.default_rng(4)
    traffic(w, rng, 5000, feedback={"v2": 0.6})
    m = by_name(judge(AnalysisSpec(metrics=(FB,)), evidence(w)), "feedback_score")
    assert m.status == "fail" and m.harm == pytest.approx(0.2, abs=0.05)
    graded = MetricWindows()
    for i in range(3000):
        for version, mean in (("v1", 0.8), ("v2", 0.7)):
            r = RequestRecord("t", version, unit_id(f"user:{version}{i}"), "50%", 0.0, finish_reason="stop")
            graded.record(r)
            graded.register_completion(f"{version}{i}", r)
            graded.record_feedback(f"{version}{i}", float(np.clip(rng.normal(mean, 0.15), 0, 1)))
    m = by_name(judge(AnalysisSpec(metrics=(FB,)), evidence(graded)), "feedback_score")
    assert m.status == "fail" and m.harm == pytest.approx(0.1, abs=0.02)


def test_probes_are_paired_and_a_greedy_set_ends_exhausted():
    w, rng = MetricWindows(), np.random.default_rng(5)
    probes(w, rng, 100)
    m = by_name(judge(AnalysisSpec(metrics=(ACC,)), evidence(w), eval_set_size=100), "probe_accuracy")
    assert m.status in ("exhausted", "pass") and m.n_candidate == 100
    w2 = MetricWindows()
    probes(w2, rng, 400, right={"v2": 0.5})
    m = by_name(judge(AnalysisSpec(metrics=(ACC,)), evidence(w2), eval_set_size=1000), "probe_accuracy")
    assert m.status == "fail" and "McNemar" in m.test and "lost" in m.test


def fixed_probes(lost: int, won: int, same_right: int = 200, same_wrong: int = 40) -> tuple[MetricWindows, int]:
    """Greedy probes with exactly ``lost`` prompts stable got right and the candidate wrong, and
    ``won`` the reverse; returns the windows and the number of prompts."""
    w = MetricWindows()
    pairs = [(1, 0)] * lost + [(0, 1)] * won + [(1, 1)] * same_right + [(0, 0)] * same_wrong
    for i, outcomes in enumerate(pairs):
        for version, ok in zip(("v1", "v2"), outcomes, strict=True):
            req = RequestRecord("t", version, 0, "probe", 0.0, finish_reason="stop", batch=BatchShare(10, 0.2, 40))
            w.record_probe(ProbeRecord("t", version, i, float(ok), 0.0, req))
    return w, len(pairs)


def test_a_greedy_set_answered_in_full_gets_one_exact_mcnemar_look():
    """Half the metric's alpha goes to one fixed-sample exact test once the set is answered in full:
    45 lost / 20 won discordant prompts is p = 0.0013 (binomial tail), beyond what the always-valid
    e-process shows (e-value 37 against 2 / alpha = 400), so the full set fails where a partly
    answered one still waits; equal versions end exhausted."""
    w, n = fixed_probes(45, 20)
    for size, status in ((10 * n, "pending"), (n, "fail")):
        m = by_name(judge(AnalysisSpec(metrics=(ACC,)), evidence(w), eval_set_size=size), "probe_accuracy")
        assert m.status == status, m.detail
        assert m.evalue == pytest.approx(37.4, abs=0.1) and m.evalue < 2 / m.alpha
    assert f"exact McNemar p {stats.binom.sf(44, 65, 0.5):.3g}, fail at {m.alpha / 2:.2g}" in m.test
    assert f"fail at {2 / m.alpha:.4g}" in m.test
    w, n = fixed_probes(30, 30)
    m = by_name(judge(AnalysisSpec(metrics=(ACC,)), evidence(w), eval_set_size=n), "probe_accuracy")
    assert m.status == "exhausted" and "exact McNemar p 0.551" in m.test


def test_latency_compares_the_twin_probes_step_times():
    w, rng = MetricWindows(), np.random.default_rng(6)
    probes(w, rng, 60, step_ms={"v2": 30.0})
    m = by_name(judge(AnalysisSpec(metrics=(LAT,)), evidence(w)), "latency")
    assert m.status == "fail" and m.harm == pytest.approx(0.5, abs=0.06) and m.lower > 0.1
    w2 = MetricWindows()
    probes(w2, rng, 60)
    assert by_name(judge(AnalysisSpec(metrics=(LAT,)), evidence(w2)), "latency").status == "pass"


def test_a_regression_confined_to_one_segment_fails_there():
    w, rng = MetricWindows(), np.random.default_rng(7)
    traffic(w, rng, 12000, segment={"v2": 0.3})
    j = judge(AnalysisSpec(metrics=(FB,)), evidence(w))
    seg = by_name(j, "feedback_score", "meta:region=r0")
    assert seg.status == "fail" and j.result == "fail"
    assert "feedback_score[meta:region=r0]" in j.reason and seg.alpha < by_name(j, "feedback_score").alpha
    assert seg.harm > 3 * by_name(j, "feedback_score").harm  # pooled, the drop is diluted


def test_an_optional_metric_holds_promotion_only_when_it_has_data_within_reach():
    fb = MetricSpec("feedback_score", "continuous", "decrease", 0.0, mde=0.05, required=False)
    w, rng = MetricWindows(), np.random.default_rng(8)
    traffic(w, rng, 300, feedback={"v2": 0.9})  # looks no worse: it holds only while a pass is in reach
    ev = evidence(w)
    base = AnalysisSpec(metrics=(MetricSpec("error_rate", "proportion", "increase", 0.0, mde=0.5), fb))
    assert judge(base, ev, elapsed_s=100.0, budget_s=1e6).result == "pending"  # feedback pending, in reach
    assert judge(base, ev, elapsed_s=100.0, budget_s=1.0).result == "pass"  # out of reach: does not hold


# --------------------------------------------------------------------------- decide

SPEC = RolloutSpec("t", "v1", "v2", steps=(1.0, 5.0, 25.0), step_interval_s=60.0)


def _metric(status: str, upper: float = 0.01, harm: float = 0.0, critical: bool = True, name: str = "error_rate",
            samples: float = 100.0) -> MetricResult:
    return MetricResult(name, status, "test", critical=critical, harm=harm, lower=-1.0, upper=upper,
                        tolerance=0.0, mde=0.02, samples_candidate=samples)


def _j(result: str, at: float, *metrics: MetricResult, samples: float = 100.0) -> Judgment:
    return Judgment(result, f"{result} at {at}", tuple(metrics), at, samples)


def _ramping(step: int = 0, started: float = 0.0) -> Rollout:
    return Rollout(SPEC, "ramping", step, started, 0.0, started)


def test_steps_advance_as_soon_as_the_upper_bounds_are_within_the_ladder():
    r = _ramping(step=0)
    assert ladder(r) == 4.0 and ladder(_ramping(2)) == 1.0
    ready = _j("pending", 60, _metric("pending", upper=0.07))
    assert decide(r, [ready], now=60).action == "advance"
    assert decide(r, [ready], now=59).action == "hold"  # least time per step
    wide = _j("pending", 60, _metric("pending", upper=0.09))
    d = decide(r, [wide], now=60)
    assert d.action == "hold" and "4 x mde" in d.reason
    assert not step_ready(r, _j("pending", 60, _metric("pending", upper=0.01, harm=0.015)))[0]  # alarming
    last = _ramping(step=2)
    assert decide(last, [_j("pending", 60, _metric("pending", upper=0.019))], now=60).action == "hold"
    assert decide(last, [_j("pass", 60, _metric("pass", upper=0.019))], now=60).action == "promote"
    shadow = Rollout(SPEC, "shadow", -1, 0.0, 0.0, 0.0)
    assert decide(shadow, [_j("pending", 60, _metric("pending", upper=0.1))], now=60).action == "advance"


def test_failures_roll_back_or_pause():
    r = _ramping()
    d = decide(r, [_j("fail", 20, _metric("fail"))], now=20)
    assert d.action == "rollback" and "critical" in d.reason
    d = decide(r, [_j("fail", 20, _metric("fail", critical=False))], now=20)
    assert d.action == "pause" and "non-critical" in d.reason


def test_pauses_for_errors_stalled_evidence_and_the_duration_limit():
    r = _ramping()
    errors = [Judgment.error("backend down", at=t) for t in (10, 20, 30)]
    assert decide(r, errors, now=30).action == "hold"  # an error is never a failure
    assert decide(r, [*errors, Judgment.error("down", at=40)], now=40).action == "pause"
    hist = [_j("pending", t, _metric("pending", upper=1.0), samples=100.0 if t < 500 else 120.0)
            for t in range(10, 2400, 10)]
    d = decide(r, hist, now=2390)
    assert d.action == "pause" and "no new sample" in d.reason
    assert decide(r, hist[:150], now=1500).action == "hold"
    long = DecisionPolicy(max_duration_s=1000.0)
    grow = [_j("pending", t, _metric("pending", upper=1.0), samples=t) for t in (990, 1000)]
    d = decide(r, grow, now=1000, policy=long)
    assert d.action == "pause" and "undecided after" in d.reason


def test_paused_and_terminal_rollouts_are_left_alone():
    for state in ("paused", "promoted", "rolled_back"):
        r = Rollout(SPEC, state, 0, 0.0, 0.0, 0.0)
        assert decide(r, [_j("fail", 10, _metric("fail"))], now=10) == Decision(
            "hold", f"rollout is {state}; nothing to decide")
    assert decide(_ramping(), [], now=10).action == "hold"


# --------------------------------------------------------------------------- specs


def test_default_metrics():
    names = {m.name: m for m in default_metrics()}
    assert set(names) == {"error_rate", "non_finite", "latency", "probe_accuracy", "feedback_score"}
    assert all(m.critical for m in names.values()) and not names["feedback_score"].required
    assert names["latency"].relative and names["non_finite"].baseline == "stable"
    assert names["error_rate"].tolerance == 0 and names["error_rate"].detectable == 0.02


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "ordinal"},
        {"direction": "up"},
        {"tolerance": -0.1},
        {"tolerance": float("nan")},
        {"tolerance": 0.0},  # no mde: what would a pass rule out?
        {"mde": 0.0},
        {"critical": "yes"},
        {"tolerance": 2.0, "kind": "proportion"},
        {"baseline": "none", "relative": True},
        {"baseline": "zero"},
    ],
)
def test_metric_spec_validation(kwargs):
    base = {"name": "m", "kind": "continuous", "direction": "increase", "tolerance": 0.1}
    with pytest.raises(RolloutSpecError):
        MetricSpec(**{**base, **kwargs})


@pytest.mark.parametrize("kwargs", [{"metrics": ()}, {"metrics": (LAT, LAT)}, {"min_samples": 5},
                                    {"alpha": 0.0}, {"beta": 0.5}, {"max_segments": -1}])
def test_analysis_spec_validation(kwargs):
    with pytest.raises(RolloutSpecError):
        AnalysisSpec(**kwargs)


def test_specs_round_trip_and_overrides():
    spec = AnalysisSpec(metrics=(LAT, ERR), min_samples=50, alpha=0.01)
    assert AnalysisSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert AnalysisSpec.from_dict({}) == AnalysisSpec()
    pol = DecisionPolicy(nodata_pause_s=600.0, max_duration_s=0.0)
    assert DecisionPolicy.from_dict(json.loads(json.dumps(pol.to_dict()))) == pol
    changed = spec.with_overrides({"latency": 0.2}, {"error_rate": 0.05})
    assert changed.metric("latency").tolerance == 0.2 and changed.metric("error_rate").mde == 0.05
    with pytest.raises(RolloutSpecError, match="no metric ttft"):
        spec.with_overrides({"ttft": 0.1})
    with pytest.raises(RolloutSpecError, match="unknown field"):
        AnalysisSpec.from_dict({"min_sample": 10})
    r = RolloutSpec("t", "v1", "v2", probe_temperature=0.7)
    assert RolloutSpec.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert math.isclose(RolloutSpec("t", "v1", "v2").step_interval_s, 30.0)
