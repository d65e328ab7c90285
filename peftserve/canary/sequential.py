"""Always-valid statistics for the canary judge: bounds that hold however often they are read.

The controller looks at the evidence every few seconds for hours. A fixed-sample test read that
often rejects a true null far more often than its level; everything here is a *confidence
sequence* or an *e-process*, whose error guarantee holds simultaneously over all looks
(Howard, Ramdas, McAuliffe & Sekhon 2021; Ramdas, Grünwald, Vovk & Shafer 2023). Three tools:

* :func:`mixture_halfwidth`: the one-sided normal-mixture boundary (Robbins 1970; the mSPRT of
  Johari, Koomen, Pekelis & Walsh 2017/2022) applied to an estimate and its variance, i.e. the
  asymptotic confidence sequence of Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas (2021). Used
  with the cluster-robust variances of :func:`stratified_difference` and :func:`paired_difference`.
* :func:`rate_ratio_evalue`: an exact e-process for "the candidate's event rate is at most
  ``R0`` times stable's", conditional on where the events fell (the conditional binomial test of
  two Poisson rates, made sequential by a fixed mixture over alternatives). For rare events
  (errors, non-finite outputs) whose normal approximations fail; with equal exposures it is the
  exact sequential McNemar test of paired outcomes. :func:`binomial_tail` is its fixed-sample
  form, for the one look at a finite eval set once it is answered in full.
* :func:`stratified_difference`: the candidate-minus-stable difference of means (or of log
  means), stratified by the allocation period (so traffic drift cannot masquerade as a
  difference while the weight changes) with a variance clustered by unit (the user or session
  that was routed, so one heavy user counts once). :func:`paired_difference` is its paired form,
  for probes compared prompt by prompt.

Pure numpy; no state, no clock.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

_NORMAL = NormalDist()

ALTERNATIVE_GRID = (1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
"""Alternatives (multiples of the null ratio) mixed, with equal weight, by :func:`rate_ratio_evalue`."""


# --------------------------------------------------------------------------- normal mixture


def z_value(alpha: float) -> float:
    """One-sided normal quantile: P(Z > z) = alpha."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), not {alpha}")
    return _NORMAL.inv_cdf(1.0 - alpha)


def mixing_precision(alpha: float, beta: float, effect: float) -> float:
    """Precision ``rho`` of the normal mixture, tuned to decide an ``effect`` quickly.

    The fixed-sample information that tells 0 from ``effect`` at one-sided levels ``alpha`` and
    ``beta`` is ``I* = ((z_alpha + z_beta) / effect)**2``; the mixture boundary is narrowest near
    ``I = rho / r`` with ``r ~ 1 / (2 log(1 / (2 alpha)) + 1)`` (Waudby-Smith et al. 2021, eq. 2.6),
    so ``rho = r * I*``. It depends on the spec only, never on the data (a requirement).
    """
    if not effect > 0:
        raise ValueError(f"effect must be > 0, not {effect}")
    info = ((z_value(alpha) + z_value(beta)) / effect) ** 2
    return info / (2.0 * math.log(1.0 / (2.0 * alpha)) + 1.0)


def mixture_halfwidth(variance: float, rho: float, alpha: float) -> float:
    """One-sided always-valid half-width for an estimate with ``variance``.

    With information ``I = 1 / variance`` and ``S = (estimate - truth) * I``, the half-normal
    mixture ``M = 2 sqrt(rho / (I + rho)) exp(S**2 / (2 (I + rho))) Phi(S / sqrt(I + rho))`` is a
    (super)martingale for a Gaussian estimate, so by Ville's inequality ``M >= 1 / alpha`` ever
    happens with probability at most ``alpha``. Solving ``M = 1 / alpha`` for ``S`` gives the
    boundary ``u * sqrt(I + rho)``; the half-width in the estimate's units is that over ``I``.
    ``estimate - halfwidth`` is then a lower bound valid at every look at once (asymptotically,
    with an estimated variance), and likewise ``estimate + halfwidth`` an upper bound. Infinite
    for a zero, infinite or missing variance.
    """
    if not (variance > 0 and math.isfinite(variance)):
        return math.inf
    info = 1.0 / variance
    base = 2.0 * math.log(1.0 / (2.0 * alpha)) + math.log1p(info / rho)
    u = math.sqrt(max(base, 0.0))
    for _ in range(3):  # u**2 = base - 2 log Phi(u): Phi is ~1 here, a few rounds converge
        u = math.sqrt(max(base - 2.0 * math.log(max(_NORMAL.cdf(u), 1e-300)), 0.0))
    return u * math.sqrt(info + rho) / info


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """Phi(x), vectorized (Abramowitz & Stegun 7.1.26 for erf, |error| < 1.5e-7)."""
    z = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    erf = 1.0 - poly * np.exp(-z * z)
    return 0.5 * (1.0 + np.sign(x) * erf)


def mixture_halfwidths(variance: np.ndarray, rho: float, alpha: float) -> np.ndarray:
    """:func:`mixture_halfwidth` for an array of variances (inf where not positive and finite)."""
    v = np.asarray(variance, dtype=float)
    ok = (v > 0) & np.isfinite(v)
    info = 1.0 / np.where(ok, v, 1.0)
    base = 2.0 * math.log(1.0 / (2.0 * alpha)) + np.log1p(info / rho)
    u = np.sqrt(np.maximum(base, 0.0))
    for _ in range(3):
        u = np.sqrt(np.maximum(base - 2.0 * np.log(np.maximum(_normal_cdf(u), 1e-300)), 0.0))
    return np.where(ok, u * np.sqrt(info + rho) / info, np.inf)


def information_for(halfwidth: float, rho: float, alpha: float) -> float:
    """The information ``I`` at which :func:`mixture_halfwidth` shrinks to ``halfwidth``.

    For a fixed ``u`` the half-width equation ``h**2 I**2 = u**2 (I + rho)`` is a quadratic in
    ``I``; ``u`` grows only like ``sqrt(log I)``, so alternating the two converges in a few rounds.
    """
    if not halfwidth > 0 or not math.isfinite(halfwidth):
        return math.inf if not halfwidth > 0 else 0.0
    h2 = halfwidth * halfwidth
    info = 1.0
    for _ in range(30):
        base = 2.0 * math.log(1.0 / (2.0 * alpha)) + math.log1p(info / rho)
        u2 = base - 2.0 * math.log(max(_NORMAL.cdf(math.sqrt(max(base, 0.0))), 1e-300))
        new = (u2 + math.sqrt(u2 * u2 + 4.0 * h2 * u2 * rho)) / (2.0 * h2)
        if abs(new - info) <= 1e-9 * new:
            return new
        info = new
    return info


# --------------------------------------------------------------------------- exact rate ratio


def rate_ratio_evalue(
    candidate_events: Sequence[float] | np.ndarray,
    stable_events: Sequence[float] | np.ndarray,
    candidate_exposure: Sequence[float] | np.ndarray,
    stable_exposure: Sequence[float] | np.ndarray,
    null_ratio: float = 1.0,
    grid: Sequence[float] = ALTERNATIVE_GRID,
) -> float:
    """E-value against "candidate rate <= ``null_ratio`` x stable rate", per stratum arrays.

    In stratum k, events of two Poisson processes with exposures ``n_c``, ``n_s`` fall in the
    candidate arm with probability ``pi = R n_c / (R n_c + n_s)``, where ``R`` is the rate ratio
    (the conditional binomial test of two Poisson rates, Przyborowski & Wilenski 1940). Under the
    null every event lands in the candidate with probability at most ``pi0`` (``R = null_ratio``),
    so for any ``pi1 > pi0`` the product over events of ``(pi1 / pi0)`` per candidate event and
    ``((1 - pi1) / (1 - pi0))`` per stable event is a nonnegative supermartingale in event time;
    an equal-weight mixture over the alternatives ``R1 = null_ratio * g`` for g in ``grid`` is one
    too, and stays valid however often it is read (Ville). Reject when it reaches ``1 / alpha``.
    Exact for independent events, whatever their rarity; a stratum with no exposure in an arm
    carries no information and is skipped. With equal exposures it is the sequential exact
    McNemar test (events = discordant pairs).
    """
    kc = np.asarray(candidate_events, float)
    ks = np.asarray(stable_events, float)
    nc = np.asarray(candidate_exposure, float)
    ns = np.asarray(stable_exposure, float)
    ok = (nc > 0) & (ns > 0)
    if not ok.any():
        return 1.0
    kc, ks, nc, ns = kc[ok], ks[ok], nc[ok], ns[ok]
    pi0 = null_ratio * nc / (null_ratio * nc + ns)  # [K]
    logs = []
    for g in grid:
        r1 = null_ratio * g
        pi1 = r1 * nc / (r1 * nc + ns)
        logs.append(float(np.sum(kc * np.log(pi1 / pi0) + ks * np.log((1 - pi1) / (1 - pi0)))))
    top = max(logs)
    return float(math.exp(min(top, 700.0)) * np.mean([math.exp(x - top) for x in logs]))


def binomial_tail(k: int, n: int, p: float = 0.5) -> float:
    """Exact ``P(X >= k)`` for ``X ~ Binomial(n, p)``: the one-sided p-value of a fixed-sample
    exact test (McNemar's, on ``n`` discordant pairs of which ``k`` went against the candidate).

    Summed in log space from ``k`` up, stopping once the terms no longer count (they fall
    geometrically past the mode), so it is exact to double precision and cheap for any ``n``.
    """
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if not 0.0 < p < 1.0:
        return float(p >= 1.0)
    lp, lq, lnf = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    logs: list[float] = []
    for j in range(k, n + 1):
        term = lnf - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq
        logs.append(term)
        if j > n * p and term < max(logs) - 745.0:
            break
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def rate_ratio_evalues(
    candidate_events: np.ndarray,
    stable_events: np.ndarray,
    candidate_exposure: np.ndarray,
    stable_exposure: np.ndarray,
    null_ratio: float = 1.0,
    grid: Sequence[float] = ALTERNATIVE_GRID,
) -> np.ndarray:
    """:func:`rate_ratio_evalue` for several groups at once: arrays [G, K] of strata per group."""
    kc, ks = np.asarray(candidate_events, float), np.asarray(stable_events, float)
    nc, ns = np.asarray(candidate_exposure, float), np.asarray(stable_exposure, float)
    ok = (nc > 0) & (ns > 0)
    nc_, ns_ = np.where(ok, nc, 1.0), np.where(ok, ns, 1.0)
    pi0 = null_ratio * nc_ / (null_ratio * nc_ + ns_)
    logs = []
    for g in grid:
        r1 = null_ratio * g
        pi1 = r1 * nc_ / (r1 * nc_ + ns_)
        logs.append(
            np.sum(
                np.where(ok, kc * np.log(pi1 / pi0) + ks * np.log((1 - pi1) / (1 - pi0)), 0.0),
                axis=-1,
            )
        )
    stack = np.stack(logs)  # [grid, G]
    top = stack.max(axis=0)
    return np.exp(np.minimum(top, 700.0)) * np.mean(np.exp(stack - top), axis=0)


# --------------------------------------------------------------------------- stratified means


@dataclass(frozen=True)
class Arm:
    """One arm's data for a mean-type metric, per (stratum, unit) cell.

    ``stratum`` and ``unit`` are small nonnegative integer codes (the same unit code in both arms
    means the same user); ``total`` the sum of the outcome over the cell's samples, ``count`` the
    number of samples. Arrays of equal length, one entry per cell with ``count > 0``.
    """

    stratum: np.ndarray
    unit: np.ndarray
    total: np.ndarray
    count: np.ndarray

    @property
    def samples(self) -> float:
        return float(self.count.sum())

    @functools.cached_property
    def units(self) -> int:
        """Distinct units."""
        if self.unit.size == 0:
            return 0
        return int(np.count_nonzero(np.bincount(self.unit)))


@dataclass(frozen=True)
class Estimate:
    """A candidate-minus-stable difference with its (cluster-robust) variance."""

    estimate: float
    variance: float
    stable_value: float
    candidate_value: float
    strata: int


def stratified_difference(
    candidate: Arm, stable: Arm, *, log_scale: bool = False, binary: bool = False
) -> Estimate | None:
    """Difference of means, candidate minus stable, within strata, combined across them.

    One stratum, one arm: the weighted mean over *units* of each unit's own mean (``total /
    count`` of its cell), weighted by :func:`unit_weight` (its samples, saturating at ten), so a
    heavy user counts at most like ten light ones and cannot decide a rollout, and the variance
    is that of a mean of independent units. ``d_k = m_c - m_s``
    (``log m_c - log m_s`` with ``log_scale``: a relative change). The strata are combined with
    the weights ``u_c u_s / (u_c + u_s)`` (units per arm) of Cochran and Mantel-Haenszel, which
    depend on the allocation only. The variance is the sandwich over units (Liang & Zeger 1986):
    each unit's influence on the combined estimate, summed over every stratum and arm it appears
    in (a user moved to the candidate by a step is one cluster), squared and summed, with the
    small-sample factor ``G / (G - 1)``. ``binary`` adds a floor: the variance is at least the
    binomial variance of smoothed proportions over the *samples*, a lower bound of the true one,
    which keeps the first looks at a rare event (zero events, zero variance) from looking
    certain. None when no stratum has units in both arms. :func:`grouped_difference` computes
    the same for many groups (segments) at once.
    """
    groups = grouped_difference(
        Grouped(np.zeros(candidate.unit.size, np.int64), candidate.stratum, candidate.unit, candidate.total,
                candidate.count),
        Grouped(np.zeros(stable.unit.size, np.int64), stable.stratum, stable.unit, stable.total, stable.count),
        1, log_scale=log_scale, binary=binary,
    )  # fmt: skip
    return groups.get(0)


@dataclass(frozen=True)
class Grouped:
    """Cells of one arm over several groups (segments): ``group``, ``stratum`` and ``unit`` are
    small nonnegative integer codes, ``total`` and ``count`` the sums per cell (count > 0)."""

    group: np.ndarray
    stratum: np.ndarray
    unit: np.ndarray
    total: np.ndarray
    count: np.ndarray


@dataclass(frozen=True)
class GroupedEstimates:
    """Per group: the estimate, its variance, both arms' values, samples and units."""

    estimate: np.ndarray
    variance: np.ndarray
    stable_value: np.ndarray
    """Unit-weighted means over the strata with both arms."""
    candidate_value: np.ndarray
    stable_samples: np.ndarray
    candidate_samples: np.ndarray
    stable_units: np.ndarray
    candidate_units: np.ndarray
    strata: np.ndarray
    """Per group and stratum: (candidate events, candidate count, stable events, stable count)."""
    counts: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

    def get(self, g: int) -> Estimate | None:
        if self.estimate[g] != self.estimate[g]:  # NaN: no stratum with both arms
            return None
        return Estimate(
            float(self.estimate[g]),
            float(self.variance[g]),
            float(self.stable_value[g]),
            float(self.candidate_value[g]),
            int(self.strata[g]),
        )


UNIT_SATURATION = 10.0
"""A unit weighs like its samples up to about this many: ``n / (1 + n / 10)``."""


def unit_weight(samples: np.ndarray) -> np.ndarray:
    """A unit's weight in its arm's mean: its samples, saturating at :data:`UNIT_SATURATION`.

    Request weights (a ratio of sums) would let one heavy user dominate a mean and hide it from
    the clustered variance; equal weights would throw away what a user's many requests say.
    Saturating weights keep most of the information while no unit counts for more than ten.
    """
    return samples / (1.0 + samples / UNIT_SATURATION)


def grouped_difference(
    candidate: Grouped,
    stable: Grouped,
    groups: int,
    *,
    log_scale: bool = False,
    binary: bool = False,
) -> GroupedEstimates:
    """:func:`stratified_difference` for every group at once (vectorized over groups).

    Bincounts over (group, stratum) and (group, unit) codes: judging all segments of a metric
    costs one pass over the cells.
    """
    if candidate.count.size == 0 or stable.count.size == 0:
        nan = np.full(groups, np.nan)
        zero = np.zeros(groups)
        empty = np.zeros((groups, 1))
        return GroupedEstimates(
            nan, nan, nan, nan, zero, zero, zero, zero, zero, (empty, empty, empty, empty)
        )
    k = int(max(candidate.stratum.max(), stable.stratum.max())) + 1
    size = groups * k

    def sums(arm: Grouped) -> tuple[np.ndarray, ...]:
        idx = arm.group * k + arm.stratum
        weight = unit_weight(arm.count)
        return (
            np.bincount(idx, weights=weight * arm.total / arm.count, minlength=size).reshape(
                groups, k
            ),
            np.bincount(idx, weights=weight, minlength=size).reshape(groups, k),  # effective units
            np.bincount(idx, weights=arm.total, minlength=size).reshape(groups, k),  # events / sums
            np.bincount(idx, weights=arm.count, minlength=size).reshape(groups, k),
        )  # samples

    mc_sum, uc, tc, nc = sums(candidate)
    ms_sum, us, ts, ns = sums(stable)
    both = (uc > 0) & (us > 0)
    safe_c, safe_s = np.where(both, uc, 1.0), np.where(both, us, 1.0)
    raw_c, raw_s = mc_sum / safe_c, ms_sum / safe_s
    if log_scale or binary:  # smoothed toward 1/2 by half a sample, for logs and floors
        sm_c = (raw_c * nc + 0.5) / (nc + 1.0)
        sm_s = (raw_s * ns + 0.5) / (ns + 1.0)
    else:
        sm_c, sm_s = raw_c, raw_s
    w = np.where(both, safe_c * safe_s / (safe_c + safe_s), 0.0)
    wsum = w.sum(axis=1, keepdims=True)
    w = np.where(wsum > 0, w / np.where(wsum > 0, wsum, 1.0), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        if log_scale:
            d = np.log(np.where(both, sm_c, 1.0)) - np.log(np.where(both, sm_s, 1.0))
        else:
            d = raw_c - raw_s
    est = np.where(both.any(axis=1), np.sum(np.where(both, w * d, 0.0), axis=1), np.nan)
    units = int(max(candidate.unit.max(), stable.unit.max())) + 1
    per_unit = np.zeros(groups * units)
    present_c = np.zeros(groups * units, dtype=bool)
    present_s = np.zeros(groups * units, dtype=bool)
    for arm, sign, raw, sm, n, present in (
        (candidate, 1.0, raw_c, sm_c, safe_c, present_c),
        (stable, -1.0, raw_s, sm_s, safe_s, present_s),
    ):
        g, s_ = arm.group, arm.stratum
        scale = n[g, s_] * (sm[g, s_] if log_scale else 1.0)
        psi = (
            sign * w[g, s_] * unit_weight(arm.count) * (arm.total / arm.count - raw[g, s_]) / scale
        )
        cell = g * units + arm.unit
        per_unit += np.bincount(cell, weights=psi, minlength=groups * units)
        present[cell] = True
    per_unit = per_unit.reshape(groups, units)
    clusters = (present_c | present_s).reshape(groups, units).sum(axis=1)
    factor = np.where(clusters > 1, clusters / np.maximum(clusters - 1, 1), 1.0)
    var = np.sum(per_unit**2, axis=1) * factor
    if binary:
        pc, ps = np.clip(sm_c, 1e-12, 1 - 1e-12), np.clip(sm_s, 1e-12, 1 - 1e-12)
        n_c, n_s = np.maximum(nc, 1.0), np.maximum(ns, 1.0)
        if log_scale:
            terms = (1 - pc) / (pc * n_c) + (1 - ps) / (ps * n_s)
        else:
            terms = pc * (1 - pc) / n_c + ps * (1 - ps) / n_s
        var = np.maximum(var, np.sum(w**2 * np.where(both, terms, 0.0), axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        c_value = np.sum(np.where(both, mc_sum, 0.0), axis=1) / np.sum(
            np.where(both, uc, 0.0), axis=1
        )
        s_value = np.sum(np.where(both, ms_sum, 0.0), axis=1) / np.sum(
            np.where(both, us, 0.0), axis=1
        )
    return GroupedEstimates(
        est,
        var,
        s_value,
        c_value,
        ns.sum(axis=1),
        nc.sum(axis=1),
        present_s.reshape(groups, units).sum(axis=1),
        present_c.reshape(groups, units).sum(axis=1),
        both.sum(axis=1),
        (tc, nc, ts, ns),
    )


def paired_difference(
    candidate: np.ndarray, stable: np.ndarray, *, binary: bool = True
) -> Estimate | None:
    """Mean of ``candidate - stable`` over paired units (prompts), with its variance.

    Each pair is one unit: a deterministic prompt answered once per version, or the mean of a
    sampled prompt's repeated answers per version. The variance is the sample variance of the
    differences over ``n``; for 0/1 outcomes (``binary``) it is floored at that of a smoothed
    discordance rate, so a run of identical answers does not read as certainty.
    """
    c, s = np.asarray(candidate, float), np.asarray(stable, float)
    n = c.size
    if n == 0:
        return None
    d = c - s
    var = float(np.var(d, ddof=1)) / n if n > 1 else math.inf
    if binary:
        discordant = float(np.count_nonzero(d))
        var = max(var, (discordant + 1.0) / (n + 2.0) / n)
    return Estimate(float(d.mean()), var, float(s.mean()), float(c.mean()), 1)
