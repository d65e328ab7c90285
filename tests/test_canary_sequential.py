"""The judge's statistics: bounds that hold under continuous looking, exact rare-event tests,
unit-clustered stratified estimates. Monte Carlo checks are sized to run in a few seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from peftserve.canary import sequential as seq


def test_mixture_halfwidth_holds_at_every_look():
    """A Gaussian running mean crosses the always-valid bound with chance at most alpha, however
    often it is read; a fixed-sample bound read at every step crosses far more often."""
    rng = np.random.default_rng(0)
    alpha, n, reps = 0.01, 2000, 1000
    rho = seq.mixing_precision(alpha, 0.05, 0.1)
    means = np.cumsum(rng.standard_normal((reps, n)), axis=1) / np.arange(1, n + 1)
    width = seq.mixture_halfwidths(1.0 / np.arange(1, n + 1), rho, alpha)
    assert (means > width).any(axis=1).mean() <= alpha
    fixed = stats.norm.ppf(1 - alpha) / np.sqrt(np.arange(1, n + 1))
    assert (means > fixed).any(axis=1).mean() > 5 * alpha  # what looking every time costs


def test_halfwidth_scalar_array_and_inverse_agree():
    rho = seq.mixing_precision(0.001, 0.05, 0.05)
    for variance in (1e-2, 1e-4, 1e-6):
        h = seq.mixture_halfwidth(variance, rho, 0.001)
        assert h == pytest.approx(
            float(seq.mixture_halfwidths(np.array([variance]), rho, 0.001)[0]), rel=1e-5
        )
        assert seq.information_for(h, rho, 0.001) == pytest.approx(1 / variance, rel=1e-6)
    assert math.isinf(seq.mixture_halfwidth(0.0, rho, 0.001))
    assert math.isinf(seq.mixture_halfwidth(float("inf"), rho, 0.001))
    # near the information it is tuned for: wider than the fixed-sample bound, narrower than
    # Bonferroni over a million looks (in standard errors)
    info = 10 * rho
    z = seq.mixture_halfwidth(1 / info, rho, 0.001) * math.sqrt(info)
    assert stats.norm.ppf(1 - 0.001) < z < stats.norm.ppf(1 - 0.001 / 1e6)


def test_rate_ratio_evalue_is_valid_with_changing_exposure_and_detects():
    """Events at equal rates under a weight that steps 1 -> 50 %: the e-process reaches 1/alpha
    in at most alpha of the runs; four times the rate is caught."""
    rng = np.random.default_rng(1)
    weights = np.repeat([0.01, 0.05, 0.1, 0.25, 0.5], 40)

    def run(ratio: float, null: float = 1.0) -> bool:
        kc = np.zeros(5)
        ks = np.zeros(5)
        nc = np.zeros(5)
        ns = np.zeros(5)
        for t, w in enumerate(weights):
            k = t // 40
            c = rng.binomial(200, w)
            kc[k] += rng.binomial(c, 0.005 * ratio)
            ks[k] += rng.binomial(200 - c, 0.005)
            nc[k] += c
            ns[k] += 200 - c
            if t % 4 == 3 and seq.rate_ratio_evalue(kc, ks, nc, ns, null) >= 100:  # 50 looks
                return True
        return False

    assert np.mean([run(1.0) for _ in range(400)]) <= 0.01
    assert np.mean([run(4.0) for _ in range(100)]) >= 0.9
    # a ratio margin: events at 1.5 x stable are not against "at most 1.5 x"
    assert np.mean([run(1.5, null=1.5) for _ in range(200)]) <= 0.01


def test_rate_ratio_evalues_match_the_scalar_form():
    kc, ks = np.array([[3, 1, 0], [0, 0, 5]]), np.array([[10, 4, 2], [7, 1, 1]])
    nc, ns = np.array([[100, 50, 0], [30, 20, 10]]), np.array([[900, 450, 300], [270, 180, 90]])
    many = seq.rate_ratio_evalues(kc, ks, nc, ns, 1.2)
    for g in range(2):
        assert many[g] == pytest.approx(seq.rate_ratio_evalue(kc[g], ks[g], nc[g], ns[g], 1.2))


def _arms(rng: np.random.Generator, users: int, effect: float = 0.0, heavy: bool = False):
    """Binary outcomes of sticky users over four allocation strata; heavy users have their own rate."""
    cand, stab = [], []
    level = rng.beta(8, 2, users) if heavy else np.full(users, 0.8)
    activity = 1 / np.arange(1, users + 1) ** 1.1 if heavy else np.ones(users)
    activity /= activity.sum()
    for k, w in enumerate((0.01, 0.05, 0.1, 0.25)):
        u = rng.choice(users, size=rng.poisson(3000), p=activity)
        in_c = (u * 7919 % users) < w * users  # a fixed cohort per weight, growing
        y = (rng.random(u.size) < np.clip(level[u] - effect * in_c, 0, 1)).astype(float)
        for arm, sel in ((cand, in_c), (stab, ~in_c)):
            uu, inv = np.unique(u[sel], return_inverse=True)
            arm.append(
                (
                    np.full(uu.size, k),
                    uu,
                    np.bincount(inv, weights=y[sel]),
                    np.bincount(inv).astype(float),
                )
            )

    def make(parts):
        return seq.Arm(*[np.concatenate([p[i] for p in parts]) for i in range(4)])

    return make(cand), make(stab)


@pytest.mark.parametrize("heavy", [False, True])
def test_stratified_difference_variance_matches_the_spread_of_estimates(heavy):
    """The unit-clustered variance tracks the true spread, heavy users included (a request-level
    variance would miss most of it); the estimate is unbiased."""
    rng = np.random.default_rng(2)
    draws = [
        seq.stratified_difference(*_arms(rng, 2000, heavy=heavy), binary=True) for _ in range(300)
    ]
    est = np.array([d.estimate for d in draws])
    var = np.array([d.variance for d in draws])
    assert abs(est.mean()) < 3 * est.std() / np.sqrt(len(est))
    assert 0.75 < var.mean() / est.var() < 1.35


def test_grouped_difference_equals_stratified_per_group():
    rng = np.random.default_rng(3)
    c, s = _arms(rng, 500, effect=0.1)
    for log_scale in (False, True):
        whole = seq.stratified_difference(c, s, binary=True, log_scale=log_scale)
        g_c = rng.integers(0, 3, c.unit.size)
        g_s = rng.integers(0, 3, s.unit.size)
        both = seq.grouped_difference(
            seq.Grouped(
                np.concatenate([np.zeros_like(c.unit), g_c + 1]),
                np.tile(c.stratum, 2),
                np.tile(c.unit, 2),
                np.tile(c.total, 2),
                np.tile(c.count, 2),
            ),
            seq.Grouped(
                np.concatenate([np.zeros_like(s.unit), g_s + 1]),
                np.tile(s.stratum, 2),
                np.tile(s.unit, 2),
                np.tile(s.total, 2),
                np.tile(s.count, 2),
            ),
            4,
            binary=True,
            log_scale=log_scale,
        )
        assert both.estimate[0] == pytest.approx(whole.estimate)
        assert both.variance[0] == pytest.approx(whole.variance)
        for g in (1, 2, 3):
            sub = seq.stratified_difference(
                seq.Arm(
                    c.stratum[g_c == g - 1],
                    c.unit[g_c == g - 1],
                    c.total[g_c == g - 1],
                    c.count[g_c == g - 1],
                ),
                seq.Arm(
                    s.stratum[g_s == g - 1],
                    s.unit[g_s == g - 1],
                    s.total[g_s == g - 1],
                    s.count[g_s == g - 1],
                ),
                binary=True,
                log_scale=log_scale,
            )
            assert both.estimate[g] == pytest.approx(sub.estimate)
            assert both.variance[g] == pytest.approx(sub.variance)


def test_stratification_removes_drift_that_pooling_would_read_as_harm():
    """Both arms drift from 0.9 to 0.6 while the weight grows: pooled, the candidate (mostly late)
    looks 20 points worse; within strata it is not."""
    unit = np.arange(8)
    c = seq.Arm(
        np.array([0, 1, 2, 3]),
        unit[:4],
        np.array([9.0, 80, 70, 600]),
        np.array([10.0, 100, 100, 1000]),
    )
    s = seq.Arm(
        np.array([0, 1, 2, 3]),
        unit[4:],
        np.array([900.0, 800, 70, 60]),
        np.array([1000.0, 1000, 100, 100]),
    )
    est = seq.stratified_difference(c, s)
    assert abs(est.estimate) < 0.01
    pooled = c.total.sum() / c.count.sum() - s.total.sum() / s.count.sum()
    assert pooled < -0.15


def test_paired_difference_floors_identical_answers():
    same = np.ones(40)
    est = seq.paired_difference(same, same)
    assert est.estimate == 0 and est.variance >= 1 / 42 / 40  # not certainty after 40 equal answers
    assert seq.paired_difference(np.zeros(0), np.zeros(0)) is None


def test_binomial_tail_is_exact():
    """The fixed-sample McNemar p-value (a fully answered eval set) against scipy's binomial."""
    for k, n, p in (
        (0, 10, 0.5),
        (7, 10, 0.5),
        (11, 10, 0.5),
        (45, 65, 0.5),
        (600, 1000, 0.5),
        (5, 100_000, 1e-4),
        (51_000, 100_000, 0.5),
        (3, 20, 0.3),
    ):
        assert seq.binomial_tail(k, n, p) == pytest.approx(
            stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300
        )
