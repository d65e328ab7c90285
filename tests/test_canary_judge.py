"""Judge, decide and analysis specs: statistics against scipy and published values,
classification and combination rules, the controller's decisions, and the acceptance
simulation (500 seeded rollouts per case through the steps with ``decide``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from peftserve.canary import judge as judge_mod
from peftserve.canary.judge import (
    Counts,
    Judgment,
    MetricSamples,
    decide,
    hl_interval_ranks,
    hodges_lehmann,
    judge,
    mann_whitney_u,
    newcombe_interval,
    pairwise_order_statistics,
    wilson_interval,
)
from peftserve.canary.spec import (
    AnalysisSpec,
    DecisionPolicy,
    MetricSpec,
    Rollout,
    RolloutSpec,
    RolloutSpecError,
    default_metrics,
)

# --------------------------------------------------------------------------- statistics


def _datasets(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (rng.lognormal(0.1, 0.5, 300), rng.lognormal(0.0, 0.5, 700)),  # continuous, unequal sizes
        (rng.normal(0, 1, 40), rng.normal(0.5, 1, 25)),
        (rng.integers(0, 5, 500).astype(float), rng.integers(0, 4, 800).astype(float)),  # heavy ties
        (np.round(rng.normal(0, 1, 350), 1), np.round(rng.normal(0.2, 1, 420), 1)),
        (rng.exponential(1, 12), rng.exponential(1, 9)),
    ]


def test_mann_whitney_matches_scipy():
    rng = np.random.default_rng(1)
    for y, x in _datasets(rng):
        u, p = mann_whitney_u(y, x)
        ref = stats.mannwhitneyu(y, x, alternative="two-sided", method="asymptotic", use_continuity=True)
        assert u == pytest.approx(ref.statistic, rel=1e-12)
        assert p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)


def test_mann_whitney_constant_data_gives_p_one():
    assert mann_whitney_u(np.ones(20), np.ones(30)) == (300.0, 1.0)


@pytest.mark.parametrize("brute_limit", [0, 1 << 40], ids=["selection", "brute-force"])
def test_pairwise_order_statistics_match_brute_force(monkeypatch, brute_limit):
    monkeypatch.setattr(judge_mod, "_BRUTE_FORCE_PAIRS", brute_limit)
    rng = np.random.default_rng(2)
    for trial in range(120):
        n, m = (int(v) for v in rng.integers(1, 400, 2))
        kind = trial % 4
        if kind == 0:
            x, y = rng.lognormal(size=n), rng.lognormal(size=m)
        elif kind == 1:  # integer data: long runs of tied differences, must be exact
            x, y = rng.integers(0, 5, n).astype(float), rng.integers(0, 6, m).astype(float)
        elif kind == 2:
            x, y = np.full(n, 3.0), rng.choice([3.0, 4.0], m)
        else:
            x, y = rng.exponential(size=n) ** 3 * 1e4, rng.exponential(size=m) ** 3 * 1e4
        d = np.sort(np.subtract.outer(y, x).ravel())
        ks = np.unique(np.r_[rng.integers(1, d.size + 1, 5), 1, d.size, (d.size + 1) // 2])
        got = pairwise_order_statistics(y, x, ks)
        if kind in (1, 2):
            np.testing.assert_array_equal(got, d[ks - 1])
        else:
            np.testing.assert_allclose(got, d[ks - 1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("brute_limit", [0, 1 << 40], ids=["selection", "brute-force"])
def test_hodges_lehmann_is_median_of_pairwise_differences(monkeypatch, brute_limit):
    monkeypatch.setattr(judge_mod, "_BRUTE_FORCE_PAIRS", brute_limit)
    rng = np.random.default_rng(3)
    for y, x in _datasets(rng):
        d = np.subtract.outer(y, x).ravel()
        est, lo, hi = hodges_lehmann(y, x, 0.98)
        assert est == pytest.approx(float(np.median(d)), rel=1e-12, abs=1e-12)
        k_lo, k_hi = hl_interval_ranks(y.size, x.size, 0.98)
        d.sort()
        assert (lo, hi) == (pytest.approx(d[k_lo - 1], abs=1e-12), pytest.approx(d[k_hi - 1], abs=1e-12))


def _mw_null_cdf(n: int, m: int) -> np.ndarray:
    """Exact P(U <= u) under no shift and no ties, by the counting recurrence."""
    # f[i][j][u]: arrangements of i candidate and j stable values with U = u.
    f = [[None] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        for j in range(m + 1):
            if i == 0 or j == 0:
                f[i][j] = np.array([1.0])
                continue
            a = np.concatenate([np.zeros(j), f[i - 1][j]])  # largest value is a candidate: +j
            b = f[i][j - 1]
            size = max(a.size, b.size)
            f[i][j] = np.pad(a, (0, size - a.size)) + np.pad(b, (0, size - b.size))
    counts = f[n][m]
    return np.cumsum(counts) / counts.sum()


@pytest.mark.parametrize(("n", "m"), [(12, 12), (20, 15), (30, 30)])
def test_hl_interval_ranks_match_exact_u_distribution(n, m):
    cdf = _mw_null_cdf(n, m)
    alpha_half = 0.01
    k_exact = int(np.searchsorted(cdf, alpha_half, side="right"))  # largest k with P(U <= k-1) <= 1 %
    k, k_up = hl_interval_ranks(n, m, 0.98)
    assert k_up == n * m + 1 - k
    assert k_exact - 1 <= k <= k_exact  # never less conservative than exact, at most one rank wider


def test_hl_interval_coverage():
    """The 98 % interval covers a true shift about 98 % of the time (floor rounding: a bit more)."""
    rng = np.random.default_rng(4)
    reps, covered = 2000, 0
    for _ in range(reps):
        x = rng.lognormal(0, 0.7, 60)
        y = rng.lognormal(0, 0.7, 45) + 0.3
        _, lo, hi = hodges_lehmann(y, x, 0.98)
        covered += lo <= 0.3 <= hi
    assert 0.97 <= covered / reps <= 0.995


@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (5, 10), (10, 10), (3, 200), (180, 200), (1, 5000)])
@pytest.mark.parametrize("confidence", [0.95, 0.98])
def test_wilson_matches_scipy(k, n, confidence):
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    lo, hi = wilson_interval(k, n, confidence)
    assert lo == pytest.approx(ref.low, abs=1e-12)
    assert hi == pytest.approx(ref.high, abs=1e-12)


# Newcombe (1998), Statistics in Medicine 17:873, Table II, method 10 (95 %).
@pytest.mark.parametrize(
    ("a", "b", "lo", "hi"),
    [
        ((56, 70), (48, 80), 0.0524, 0.3339),
        ((9, 10), (3, 10), 0.1705, 0.8090),
        ((6, 7), (2, 7), 0.0582, 0.8062),
        ((5, 56), (0, 29), -0.0381, 0.1926),
        ((0, 10), (0, 20), -0.1611, 0.2775),
        ((10, 10), (0, 20), 0.6791, 1.0000),
    ],
)
def test_newcombe_matches_published_values(a, b, lo, hi):
    d, got_lo, got_hi = newcombe_interval(Counts(*a), Counts(*b), 0.95)
    assert d == pytest.approx(a[0] / a[1] - b[0] / b[1])
    assert (round(got_lo, 4), round(got_hi, 4)) == (lo, hi)


def test_newcombe_matches_formula_on_scipy_wilson():
    for (k1, n1), (k2, n2) in [((30, 300), (12, 290)), ((0, 250), (3, 4000)), ((180, 200), (160, 200))]:
        w1 = stats.binomtest(k1, n1).proportion_ci(0.98, method="wilson")
        w2 = stats.binomtest(k2, n2).proportion_ci(0.98, method="wilson")
        p1, p2 = k1 / n1, k2 / n2
        ref_lo = p1 - p2 - math.sqrt((p1 - w1.low) ** 2 + (w2.high - p2) ** 2)
        ref_hi = p1 - p2 + math.sqrt((w1.high - p1) ** 2 + (p2 - w2.low) ** 2)
        _, lo, hi = newcombe_interval(Counts(k1, n1), Counts(k2, n2), 0.98)
        assert (lo, hi) == (pytest.approx(ref_lo, abs=1e-12), pytest.approx(ref_hi, abs=1e-12))


# --------------------------------------------------------------------------- judge

LAT = MetricSpec("latency", "continuous", "increase", 0.2, relative=True)
ERR = MetricSpec("errors", "proportion", "increase", 0.01, critical=True)
ACC = MetricSpec("accuracy", "proportion", "decrease", 0.05)


def _analysis(*metrics: MetricSpec, **kw) -> AnalysisSpec:
    return AnalysisSpec(metrics=metrics, **kw)


def test_continuous_fail_pass_and_relative_tolerance():
    rng = np.random.default_rng(5)
    stable = rng.lognormal(0, 0.3, 2000)  # median ~1.0: tolerance 0.2 absolute
    slow = judge(_analysis(LAT), {"latency": MetricSamples(stable, 1.5 * rng.lognormal(0, 0.3, 2000))})
    m = slow.metrics[0]
    assert m.classification == "fail"
    assert m.tolerance == pytest.approx(0.2 * np.median(stable))
    assert m.interval[0] > m.tolerance  # the rule: whole interval beyond the tolerance
    assert m.stable_value == pytest.approx(np.median(stable))
    fast = judge(_analysis(LAT), {"latency": MetricSamples(stable, 0.5 * rng.lognormal(0, 0.3, 2000))})
    assert fast.metrics[0].classification == "pass"  # only the harmful direction counts
    assert fast.result == "pass" and fast.score == 100.0


def test_proportion_harmful_decrease():
    data = {"accuracy": MetricSamples(Counts(1800, 2000), Counts(1600, 2000))}  # 0.90 -> 0.80
    j = judge(_analysis(ACC), data)
    m = j.metrics[0]
    assert m.classification == "fail"
    assert m.estimate == pytest.approx(-0.10)
    assert m.interval[1] < -0.05
    better = judge(_analysis(ACC), {"accuracy": MetricSamples(Counts(1600, 2000), Counts(1900, 2000))})
    assert better.metrics[0].classification == "pass"


def test_proportion_accepts_zero_one_outcomes():
    rng = np.random.default_rng(6)
    s, c = rng.random(500) < 0.9, rng.random(400) < 0.9
    a = judge(_analysis(ACC), {"accuracy": MetricSamples(s, c.astype(int))})
    b = judge(_analysis(ACC), {"accuracy": MetricSamples(Counts(int(s.sum()), 500), Counts(int(c.sum()), 400))})
    assert a.metrics[0] == b.metrics[0]


def test_inconclusive_when_estimate_beyond_tolerance_but_interval_reaches_within():
    # 0.90 vs 0.83 at 200 per arm: estimate -0.07 is beyond -0.05, the interval reaches to ~0
    data = {"accuracy": MetricSamples(Counts(180, 200), Counts(166, 200))}
    j = judge(_analysis(ACC), data)
    assert j.metrics[0].classification == "inconclusive"
    assert j.result == "nodata" and "inconclusive" in j.reason and "accuracy" in j.reason


def test_too_few_samples_is_nodata_never_fail():
    data = {"errors": MetricSamples(Counts(0, 5000), Counts(150, 199))}  # terrible, but 199 < 200
    j = judge(_analysis(ERR), data)
    assert j.metrics[0].classification == "nodata"
    assert j.result == "nodata" and j.score is None
    assert judge(_analysis(ERR), {}).result == "nodata"  # a metric missing from data has none


def test_critical_failure_fails_judgment_and_names_the_metric():
    rng = np.random.default_rng(7)
    lat = rng.lognormal(0, 0.3, 1000)
    data = {
        "latency": MetricSamples(lat, rng.lognormal(0, 0.3, 1000)),
        "errors": MetricSamples(Counts(5, 1000), Counts(80, 1000)),
        "accuracy": MetricSamples(Counts(900, 1000), Counts(900, 1000)),
    }
    j = judge(_analysis(LAT, ERR, ACC), data)
    assert j.result == "fail"
    assert j.failed_critical == ("errors",)
    assert "errors" in j.reason and "[" in j.reason  # the numbers it was made from
    assert j.score == pytest.approx(200 / 3)


def test_score_marginal_and_fail_thresholds():
    rng = np.random.default_rng(8)
    base = rng.lognormal(0, 0.3, 1000)
    metrics = [MetricSpec(f"m{i}", "continuous", "increase", 0.2, relative=True) for i in range(5)]
    ok = {f"m{i}": MetricSamples(base, rng.lognormal(0, 0.3, 1000)) for i in range(5)}
    bad = MetricSamples(base, 2 * rng.lognormal(0, 0.3, 1000))
    one = judge(_analysis(*metrics), {**ok, "m0": bad})
    assert (one.result, one.score) == ("marginal", 80.0)
    assert "m0" in one.reason
    two = judge(_analysis(*metrics), {**ok, "m0": bad, "m1": bad})
    assert (two.result, two.score) == ("fail", 60.0)
    heavy = [MetricSpec("m0", "continuous", "increase", 0.2, relative=True, weight=0.1), *metrics[1:]]
    light = judge(_analysis(*heavy), {**ok, "m0": bad})
    assert light.result == "pass" and light.score == pytest.approx(100 * 4 / 4.1)


def test_critical_metric_without_data_holds_noncritical_without_data_is_ignored():
    rng = np.random.default_rng(9)
    lat = {"latency": MetricSamples(rng.lognormal(size=500), rng.lognormal(size=500))}
    j = judge(_analysis(LAT, ERR), lat)
    assert j.result == "nodata" and "errors" in j.reason
    j = judge(_analysis(LAT, ACC), lat)
    assert j.result == "pass" and j.score == 100.0


def test_judge_refuses_invalid_data():
    rng = np.random.default_rng(10)
    good = rng.lognormal(size=300)
    with pytest.raises(ValueError, match="non-finite"):
        judge(_analysis(LAT), {"latency": MetricSamples(good, np.r_[good, np.nan])})
    with pytest.raises(ValueError, match="0/1"):
        judge(_analysis(ACC), {"accuracy": MetricSamples(np.full(300, 0.5), np.ones(300))})
    with pytest.raises(ValueError, match="counts"):
        judge(_analysis(LAT), {"latency": MetricSamples(Counts(1, 300), Counts(1, 300))})
    with pytest.raises(ValueError, match="not in the analysis"):
        judge(_analysis(LAT), {"nope": MetricSamples(good, good)})
    with pytest.raises(ValueError):
        Counts(5, 3)


def test_judgment_json_round_trip():
    rng = np.random.default_rng(11)
    data = {
        "latency_e2e": MetricSamples(rng.lognormal(size=400), rng.lognormal(size=400)),
        "error_rate": MetricSamples(Counts(np.int64(2), np.int64(400)), Counts(3, 400)),
        "probe_accuracy": MetricSamples(Counts(360, 400), Counts(350, 400)),
        "non_finite": MetricSamples(Counts(0, 400), Counts(0, 400)),
    }
    j = judge(AnalysisSpec(), data, at=1234.5)
    again = Judgment.from_dict(json.loads(json.dumps(j.to_dict())))
    assert again == j
    with pytest.raises(ValueError):
        Judgment.from_dict({**j.to_dict(), "result": "great"})
    err = Judgment.error("metrics backend down", at=5.0)
    assert Judgment.from_dict(json.loads(json.dumps(err.to_dict()))) == err


# --------------------------------------------------------------------------- specs


def test_default_metrics():
    by_name = {m.name: m for m in default_metrics()}
    assert set(by_name) == {"error_rate", "latency_e2e", "ttft", "probe_accuracy", "feedback_score", "non_finite"}
    assert by_name["error_rate"].critical and by_name["error_rate"].kind == "proportion"
    assert by_name["non_finite"].critical and by_name["non_finite"].tolerance == 0
    assert by_name["latency_e2e"].relative and by_name["ttft"].direction == "increase"
    assert by_name["probe_accuracy"].direction == "decrease"
    assert by_name["feedback_score"].direction == "decrease"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metrics": ()},
        {"metrics": (LAT, LAT)},
        {"min_samples": 5},
        {"min_samples": 200.5},
        {"confidence": 1.0},
        {"marginal_threshold": 96.0},
        {"pass_threshold": 101.0},
    ],
)
def test_analysis_spec_validation(kwargs):
    with pytest.raises(RolloutSpecError):
        AnalysisSpec(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "ordinal"},
        {"direction": "up"},
        {"tolerance": -0.1},
        {"tolerance": float("nan")},
        {"weight": 0.0},
        {"critical": "yes"},
        {"tolerance": 2.0, "kind": "proportion"},
    ],
)
def test_metric_spec_validation(kwargs):
    base = {"name": "m", "kind": "continuous", "direction": "increase", "tolerance": 0.1}
    with pytest.raises(RolloutSpecError):
        MetricSpec(**{**base, **kwargs})


def test_analysis_and_policy_json_round_trip():
    spec = AnalysisSpec(metrics=(LAT, ERR), min_samples=50, confidence=0.95)
    assert AnalysisSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert AnalysisSpec.from_dict({}) == AnalysisSpec()
    pol = DecisionPolicy(max_failed=2, nodata_pause_s=600.0)
    assert DecisionPolicy.from_dict(json.loads(json.dumps(pol.to_dict()))) == pol
    with pytest.raises(RolloutSpecError, match="unknown field"):
        AnalysisSpec.from_dict({"min_sample": 10})
    with pytest.raises(RolloutSpecError, match="missing tolerance"):
        AnalysisSpec.from_dict({"metrics": [{"name": "m", "kind": "continuous", "direction": "increase"}]})
    with pytest.raises(RolloutSpecError):
        DecisionPolicy(max_failed=0)


# --------------------------------------------------------------------------- decide

SPEC = RolloutSpec("reverse", "v1", "v2", step_interval_s=60.0)


def _j(result: str, at: float, critical: bool = False) -> Judgment:
    """A hand-made judgment; ``critical`` adds a failed critical metric."""
    metrics = ()
    if critical:
        metrics = (judge_mod.MetricResult("error_rate", "proportion", "increase", True, 1.0, "fail", 500, 500),)
    return Judgment(result, None, f"{result} at {at}", metrics, at)


def _ramping(step: int = 0, started: float = 0.0) -> Rollout:
    return Rollout(SPEC, "ramping", step, started, 0.0, started)


def test_decide_advances_after_pass_and_interval():
    r = _ramping(step=1, started=100.0)
    assert decide(r, [_j("pass", 130.0)], now=130.0).action == "hold"  # 30 s of 60
    d = decide(r, [_j("pass", 160.0)], now=160.0)
    assert d.action == "advance" and "10 %" in d.reason
    assert decide(r, [_j("pass", 90.0)], now=200.0).action == "hold"  # judged before this step began
    last = _ramping(step=len(SPEC.steps) - 1, started=0.0)
    assert decide(last, [_j("pass", 60.0)], now=60.0).action == "promote"
    shadow = Rollout(SPEC, "shadow", -1, 0.0, 0.0, 0.0)
    assert decide(shadow, [_j("pass", 60.0)], now=60.0).action == "advance"


def test_decide_rollback_rules():
    r = _ramping()
    d = decide(r, [_j("pass", 10), _j("fail", 20, critical=True)], now=20)
    assert d.action == "rollback" and "critical" in d.reason
    lenient = DecisionPolicy(rollback_on_critical=False)
    assert decide(r, [_j("fail", 20, critical=True)], now=20, policy=lenient).action == "hold"
    hist = [_j("fail", 10), _j("nodata", 20), _j("fail", 30), _j("marginal", 40)]
    assert decide(r, hist, now=40).action == "hold"  # two failures
    d = decide(r, [*hist, _j("fail", 50)], now=50)
    assert d.action == "rollback" and "3 failed" in d.reason  # three in all, not in a row


def test_decide_pause_rules():
    r = _ramping()
    marg = [_j("marginal", 10), _j("error", 20), _j("marginal", 30)]
    assert decide(r, marg, now=30).action == "hold"
    d = decide(r, [*marg, _j("marginal", 40)], now=40)
    assert d.action == "pause" and "3 marginal" in d.reason  # the error in between is skipped
    errors = [_j("error", t) for t in (10, 20, 30)]
    assert decide(r, errors, now=30).action == "hold"  # an error is never a failure
    assert decide(r, [*errors, _j("error", 40)], now=40).action == "pause"
    assert decide(r, [_j("nodata", 1790)], now=1790).action == "hold"
    d = decide(r, [_j("nodata", 1800)], now=1800)
    assert d.action == "pause" and "1800" in d.reason
    # the no-data clock restarts at the last judgment with data
    assert decide(r, [_j("marginal", 1000), _j("nodata", 1800)], now=1800).action == "hold"


def test_decide_leaves_paused_and_terminal_rollouts_alone():
    for state in ("paused", "promoted", "rolled_back"):
        r = Rollout(SPEC, state, 0, 0.0, 0.0, 0.0)
        assert decide(r, [_j("fail", 10, critical=True)], now=10).action == "hold"
    assert decide(_ramping(), [], now=10).action == "hold"


# --------------------------------------------------------------------------- acceptance simulation
#
# Synthetic traffic for one task: RATE requests a minute split by the rollout's weight, PROBES
# known-answer probes a minute sent to each version. Every minute the controller judges the
# current step's window (samples since the step began; continuous metrics keep the most recent
# CAP per arm, as a bounded metric window would) with the default analysis and applies
# ``decide``. Per-request metrics: error (0.5 %), non-finite output (never), end-to-end latency
# (lognormal, median 1 s, sigma 0.5) and time to first token (median 0.2 s); feedback is absent
# (no data, so it must not block). A rollout ends when promoted, rolled back or paused.

RATE, PROBES, CAP, TICK = 3000, 100, 250, 60.0
N_ROLLOUTS = 500


def _simulate(seed: int, *, acc: float = 0.90, e2e: float = 1.0, ttft: float = 1.0,
              rate: int = RATE, probes: int = PROBES, n: int = N_ROLLOUTS, max_minutes: int = 240):
    """Run ``n`` rollouts; returns the list of (final state, step index, minutes, last reason)."""
    rng = np.random.default_rng(seed)
    spec = RolloutSpec("reverse", "v1", "v2")
    outcomes = []
    for _ in range(n):
        rollout, history, t = Rollout.start(spec, 0.0), [], 0.0
        win = None
        while rollout.active and t < max_minutes * TICK:
            if win is None:  # a new step: fresh windows
                win = {"e2e": [np.empty(0)] * 2, "ttft": [np.empty(0)] * 2,
                       "err": [[0, 0], [0, 0]], "nf": [[0, 0], [0, 0]], "acc": [[0, 0], [0, 0]]}
            t += TICK
            n_c = round(rate * rollout.weight / 100)
            for arm, count, scale_e, scale_t, p_acc in ((0, rate - n_c, 1.0, 1.0, 0.90), (1, n_c, e2e, ttft, acc)):
                k = min(count, CAP)
                win["e2e"][arm] = np.concatenate([win["e2e"][arm], scale_e * rng.lognormal(0.0, 0.5, k)])[-CAP:]
                win["ttft"][arm] = np.concatenate([win["ttft"][arm], scale_t * 0.2 * rng.lognormal(0.0, 0.5, k)])[-CAP:]
                win["err"][arm][0] += rng.binomial(count, 0.005)
                win["err"][arm][1] += count
                win["nf"][arm][1] += count
                win["acc"][arm][0] += rng.binomial(probes, p_acc)
                win["acc"][arm][1] += probes
            data = {
                "latency_e2e": MetricSamples(*win["e2e"]),
                "ttft": MetricSamples(*win["ttft"]),
                "error_rate": MetricSamples(*(Counts(*c) for c in win["err"])),
                "non_finite": MetricSamples(*(Counts(*c) for c in win["nf"])),
                "probe_accuracy": MetricSamples(*(Counts(*c) for c in win["acc"])),
            }
            history.append(judge(spec.analysis, data, at=t))
            decision = decide(rollout, history, now=t)
            if decision.action == "advance":
                win = None
            rollout = rollout.apply(decision.action, t)
            if rollout.state == "paused":
                break
        outcomes.append((rollout.state, rollout.step_index, t / TICK, decision.reason))
    return outcomes


def _share(outcomes, state: str) -> float:
    return sum(o[0] == state for o in outcomes) / len(outcomes)


def test_acceptance_identical_arms_rarely_rolled_back():
    out = _simulate(seed=100)
    assert _share(out, "rolled_back") <= 0.01
    assert _share(out, "promoted") >= 0.95  # and they do get through


def test_acceptance_accuracy_drop_rolled_back():
    out = _simulate(seed=200, acc=0.80)
    assert _share(out, "rolled_back") >= 0.95
    assert _share(out, "promoted") == 0.0


def test_acceptance_latency_increase_rolled_back():
    out = _simulate(seed=300, e2e=1.5, ttft=1.5)
    assert _share(out, "rolled_back") >= 0.95
    assert _share(out, "promoted") == 0.0


def test_acceptance_too_few_samples_never_rolls_back_and_pauses_after_limit():
    # 1 % of 60 requests a minute and 5 probes a minute: no arm reaches 200 samples in 30 min.
    # The candidate is bad on purpose: without the data to show it, that is still no failure.
    out = _simulate(seed=400, acc=0.5, e2e=3.0, ttft=3.0, rate=60, probes=5)
    assert _share(out, "rolled_back") == 0.0
    assert all(o[0] == "paused" for o in out)
    limit_min = SPEC.policy.nodata_pause_s / TICK
    assert all(o[2] == limit_min for o in out)  # at the first judgment past the limit
    assert all("no conclusive judgment" in o[3] for o in out)


def test_one_latency_metric_alone_pauses_for_a_person():
    """Only end-to-end latency 50 % slower: one non-critical failure out of five metrics with
    data scores 80 (marginal), so the rollout pauses rather than rolls back."""
    out = _simulate(seed=500, e2e=1.5, n=50)
    assert all(o[0] == "paused" for o in out)
    assert all("marginal" in o[3] for o in out)


def test_resume_starts_streaks_afresh():
    """A person resumes a rollout paused by 3 marginal judgments (or 4 evaluator errors): one more
    of the same must not pause it again at once."""
    paused = _ramping(0, 0.0).apply("pause", 35)
    resumed = paused.apply("resume", 50)
    marg = [_j("marginal", 10), _j("marginal", 20), _j("marginal", 30)]
    assert decide(_ramping(0, 0.0), marg, now=30).action == "pause"
    assert decide(resumed, [*marg, _j("marginal", 60)], now=60).action == "hold"
    errors = [_j("error", t) for t in (10, 20, 30, 40)]
    assert decide(resumed, [*errors, _j("error", 60)], now=60).action == "hold"
    assert decide(resumed, [*marg, *(_j("marginal", t) for t in (60, 70, 80))], now=80).action == "pause"
