"""The rollout plan: how long a rollout should take at the task's traffic, said at its start.

:func:`plan_rollout` replays :func:`peftserve.canary.judge.decide`'s rule on expected evidence:
at step i of k the required metrics' upper bounds must come within ``2 ** (k - 1 - i)`` times
their mde, at the last step below it; each step lasts at least ``step_interval_s``. Information
accrues per metric at the rate its samples come in: user requests split by the step's weight
(``w (1 - w)`` of the traffic's information goes into a comparison), probes as balanced pairs.
Per-sample spreads are priors (:data:`PRIOR_SD`), not measurements, so the plan is an order of
magnitude: its value is in the warnings it gives before anyone waits (no traffic, an eval set
too small for its mde, a rollout longer than ``max_duration_s``).
"""

from __future__ import annotations

import math
from typing import Any

from peftserve.canary import sequential as seq
from peftserve.canary.spec import MetricSpec, RolloutSpec

PRIOR_SD: dict[str, float] = {
    "error_rate": math.sqrt(0.01 * 0.99),
    "non_finite": math.sqrt(0.001 * 0.999),
    "latency": 0.2,
    "latency_e2e": 0.6,
    "ttft": 0.6,
    "tpot": 0.6,
    "output_tokens": 0.6,
    "feedback_score": 0.45,
    "probe_accuracy": math.sqrt(0.2),
    "shadow_divergence": 1.0,
}
"""Assumed spread of one sample's contribution (harm units): a 1 % error rate, a 0.1 % non-finite
rate, a probe's engine time per step within 20 %, a 20 % discordance between versions on probes."""
PROBE_FED = frozenset({"error_rate", "non_finite", "latency", "probe_accuracy"})
"""Metrics the probes feed (as paired prompts, or as requests in the probe stratum)."""
PROBE_ONLY = frozenset({"latency", "probe_accuracy"})
"""Metrics only the probes feed."""
FOREVER = 10 * 365 * 86400.0


def _duration(seconds: float) -> str:
    if seconds >= FOREVER:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _information(metric: MetricSpec, spec: RolloutSpec, halfwidth: float) -> float:
    alpha = spec.analysis.alpha / (2 * len(spec.analysis.metrics))
    log_scale = metric.relative
    tol, mde = metric.tolerance, metric.detectable
    if log_scale:
        tol, mde, halfwidth = math.log1p(tol), math.log1p(mde), math.log1p(halfwidth)
    effect = mde - tol if mde > tol else max(mde, 1e-6)
    rho = seq.mixing_precision(spec.analysis.beta, alpha, effect)
    return seq.information_for(halfwidth, rho, spec.analysis.beta)


def _rates(metric: MetricSpec, weight: float, rate: float, probe_rate: float) -> float:
    """Information per second the metric gathers at ``weight`` percent (per unit of 1/sd**2)."""
    w = weight / 100.0
    info = 0.0
    if metric.name not in PROBE_ONLY:
        info += rate * w * (1.0 - w)
    if metric.name in PROBE_FED and probe_rate > 0:
        info += probe_rate if metric.name in PROBE_ONLY else probe_rate / 2.0
    return info


def plan_rollout(
    spec: RolloutSpec, rate: float, probe_rate: float, eval_set_size: int | None, interval_s: float
) -> dict[str, Any]:
    """Expected duration of ``spec`` at ``rate`` requests/s and ``probe_rate`` probe pairs/s.

    Returns ``{"expected_s", "steps": [{"weight", "expected_s"}], "metrics": [{"name",
    "samples", "expected_s"}], "warnings": [...], "summary"}``.
    """
    steps = list(spec.steps)
    phases = ([0.0] if spec.shadow_percent > 0 else []) + steps
    required = [m for m in spec.analysis.metrics if m.required]
    warnings: list[str] = []
    if rate <= 0 and probe_rate <= 0:
        warnings.append(
            f"no traffic for task {spec.task!r} in the last 5 minutes and no probes: the rollout "
            "waits for traffic (give an eval set to let probes decide)"
        )
    gathered = {m.name: 0.0 for m in required}
    per_step = []
    total = 0.0
    for i, weight in enumerate(phases):
        left = len(phases) - 1 - i
        factor = 1.0 if left == 0 else float(2**left)
        wait = spec.step_interval_s
        for m in required:
            sd = PRIOR_SD.get(m.name, 1.0)
            need = _information(m, spec, factor * m.detectable) * sd * sd
            info_rate = _rates(m, weight if weight > 0 else spec.shadow_percent, rate, probe_rate)
            if (
                m.name == "probe_accuracy"
                and eval_set_size is not None
                and spec.probe_temperature == 0
            ):
                cap = float(eval_set_size)  # a greedy set holds this many pairs, no more
                need = min(need, cap)
            short = need - gathered[m.name]
            if short > 0:
                wait = max(wait, short / info_rate if info_rate > 0 else FOREVER)
        for m in required:
            gathered[m.name] += (
                _rates(m, weight if weight > 0 else spec.shadow_percent, rate, probe_rate) * wait
            )
        wait = min(wait, FOREVER)
        per_step.append({"weight": weight, "expected_s": wait})
        total = min(total + wait, FOREVER)
    metrics = []
    for m in required:
        sd = PRIOR_SD.get(m.name, 1.0)
        samples = _information(m, spec, m.detectable) * sd * sd
        metrics.append({"name": m.name, "samples": samples})
        if (
            m.name == "probe_accuracy"
            and eval_set_size is not None
            and spec.probe_temperature == 0
            and samples > eval_set_size
        ):
            best = _best_halfwidth(m, spec, eval_set_size, sd)
            warnings.append(
                f"the {eval_set_size}-prompt eval set can rule out a drop of about {best:.0%} at best "
                f"(mde {m.detectable:.0%}, needs ~{samples:.0f} prompts): probe_accuracy will end "
                "'exhausted' rather than pass; give a larger set or sampled probes"
            )
    limit = spec.policy.max_duration_s
    if limit > 0 and total > limit:
        warnings.append(
            f"expected to take {_duration(total)}, more than max_duration_s ({_duration(limit)}): raise "
            "the mdes, send more traffic or probes, or use fewer steps"
        )
    traffic = f"{rate:.3g} req/s" + (
        f" and {probe_rate:.3g} probe pairs/s" if probe_rate > 0 else ""
    )
    summary = f"about {_duration(total)} at {traffic}"
    if warnings:
        summary += f" ({len(warnings)} warning{'s' if len(warnings) > 1 else ''})"
    return {
        "expected_s": total,
        "rate": rate,
        "probe_rate": probe_rate,
        "steps": per_step,
        "metrics": metrics,
        "warnings": warnings,
        "summary": summary,
    }


def _best_halfwidth(metric: MetricSpec, spec: RolloutSpec, n: int, sd: float) -> float:
    """Upper-bound half-width the metric reaches with ``n`` samples (bisection on the mde scale)."""
    lo, hi = 1e-4, 10.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if _information(metric, spec, mid) * sd * sd > n:
            lo = mid
        else:
            hi = mid
    return hi
