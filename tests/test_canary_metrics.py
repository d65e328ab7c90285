"""Metric windows: judged arms, experiment flag, feedback TTL, probes, shadow, bounds, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from peftserve.canary.judge import Counts, judge
from peftserve.canary.metrics import METRICS, MetricWindows, check_metrics, metric_kind
from peftserve.canary.router import Router
from peftserve.canary.spec import (
    AnalysisSpec,
    MetricSpec,
    Rollout,
    RolloutSpec,
    RolloutSpecError,
    default_metrics,
)


class Clock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


ALL = AnalysisSpec(metrics=(
    *default_metrics(),
    MetricSpec("tpot", "continuous", "increase", 0.2, relative=True),
    MetricSpec("output_tokens", "continuous", "increase", 10.0),
    MetricSpec("finish_length", "proportion", "increase", 0.05),
    MetricSpec("shadow_divergence", "continuous", "increase", 0.5),
))


def test_request_metrics_count_experiment_requests_only():
    clock = Clock()
    w = MetricWindows(clock=clock)
    for i in range(10):
        w.record_request("t", "v1", e2e=1.0 + i, ttft=0.1, tpot=0.01, output_tokens=5, finish_reason="stop")
        w.record_request("t", "v2", e2e=2.0, ttft=0.2, tpot=0.02, output_tokens=9, finish_reason="length",
                         error=i < 2)
    w.record_request("t", "v2", non_finite=True)
    w.record_request("t", "v2", e2e=99.0, finish_reason="abort")  # aborted: no latency
    w.record_request("t", "v2", e2e=50.0, in_experiment=False)  # pinned: never judged
    data = w.samples("t", "v1", "v2", 0.0, ALL)
    assert data["error_rate"].stable == Counts(0, 10)
    assert data["error_rate"].candidate == Counts(3, 12)  # non-finite is also an error
    assert data["non_finite"].candidate == Counts(1, 12)
    assert data["latency_e2e"].stable.tolist() == [1.0 + i for i in range(10)]
    assert data["latency_e2e"].candidate.tolist() == [2.0] * 8  # failed, aborted and pinned left out
    assert len(data["ttft"].candidate) == 10
    assert data["tpot"].candidate.tolist() == [0.02] * 8
    assert data["output_tokens"].stable.tolist() == [5.0] * 10
    assert data["finish_length"].candidate == Counts(10, 12)
    for name in ("feedback_score", "probe_accuracy", "shadow_divergence"):
        assert name not in data  # no data at all: left out, the judge reads nodata
    assert set(data) <= {m.name for m in ALL.metrics}
    judge(ALL, data)  # exactly the judge's input: no ValueError
    s = w.summary("t", "v2", 0.0)
    assert (s["requests"], s["in_experiment"], s["errors"], s["non_finite"]) == (13, 12, 3, 1)
    assert s["finish_reasons"] == {"length": 10, "abort": 1}


def test_router_decisions_set_the_experiment_flag():
    router = Router()
    router.set_task("t", "v1", ["v1", "v2"])
    router.set_rollout(Rollout(RolloutSpec("t", "v1", "v2", steps=(50.0,)), "ramping", 0, 0.0, 0.0, 0.0))
    w = MetricWindows(clock=Clock())
    for i in range(400):
        w.record_route(router.route("t", user=f"u{i}"), e2e=1.0)
    for i in range(50):
        w.record_route(router.route("t@v2", user=f"p{i}"), e2e=1.0)  # pins
        w.record_route(router.route("t", user=f"o{i}", headers={"X-Canary": "always"}, is_admin=True), e2e=1.0)
    data = w.samples("t", "v1", "v2", 0.0, AnalysisSpec(metrics=(default_metrics()[0],)))
    n_s, n_c = data["error_rate"].stable.total, data["error_rate"].candidate.total
    assert n_s + n_c == 400 and 150 < n_c < 250
    assert w.summary("t", "v2", 0.0)["requests"] == n_c + 100


def test_window_starts_at_since_and_nonfinite_timings_are_dropped():
    clock = Clock(100.0)
    w = MetricWindows(clock=clock)
    w.record_request("t", "v1", e2e=1.0)
    clock.t = 200.0
    w.record_request("t", "v1", e2e=float("nan"), ttft=float("inf"))
    w.record_request("t", "v1", e2e=3.0, at=250.0)
    data = w.samples("t", "v1", "v2", 150.0, ALL)
    assert data["error_rate"].stable == Counts(0, 2)
    assert data["latency_e2e"].stable.tolist() == [3.0]
    assert "ttft" not in data


def test_feedback_attribution_ttl_and_validation():
    clock = Clock()
    w = MetricWindows(clock=clock, feedback_ttl_s=60.0, max_completions=3)
    assert w.record_feedback("nope", 1.0) is False  # unknown id: the API answers 404
    w.register_completion("a", "t", "v1", arm="stable")
    w.register_completion("b", "t", "v2", arm="candidate")
    w.register_completion("pin", "t", "v2", in_experiment=False)
    assert w.record_feedback("a", True) and w.record_feedback("b", 0.25)
    assert w.record_feedback("b", 0.5)  # a second score replaces the first
    assert w.record_feedback("pin", 1.0)
    data = w.samples("t", "v1", "v2", 0.0, ALL)
    assert data["feedback_score"].stable.tolist() == [1.0]
    assert data["feedback_score"].candidate.tolist() == [0.5]  # the pinned completion is not judged
    for bad in (1.5, -0.1, float("nan"), "good", None):
        with pytest.raises(ValueError):
            w.record_feedback("a", bad)
    clock.t += 61
    assert w.record_feedback("a", 1.0) is False  # expired
    w.register_completion("c", "t", "v1")
    for i in range(3):
        w.register_completion(f"n{i}", "t", "v1")
    assert w.record_feedback("c", 1.0) is False  # evicted by the cap on remembered ids


def test_probes_and_shadow_feed_the_candidate_arm():
    clock = Clock()
    w = MetricWindows(clock=clock)
    for i in range(20):
        w.record_probe("t", "v1", True)
        w.record_probe("t", "v2", i % 4 != 0)
        w.record_request("t", "v1", e2e=1.0, ttft=0.1)
        w.record_shadow("t", "v1", "v2", exact_match=i % 2 == 0, llr=0.5, e2e=1.5, error=i == 0, out_len=7, ttft=0.2)
        w.record_noise_floor("t", 0.25)
    w.record_noise_floor("t", float("nan"))  # not finite: ignored
    ramping = w.samples("t", "v1", "v2", 0.0, ALL)
    assert ramping["probe_accuracy"].stable == Counts(20, 20)
    assert ramping["probe_accuracy"].candidate == Counts(15, 20)
    assert ramping["error_rate"].candidate == Counts(0, 0)  # no live candidate traffic
    assert ramping["shadow_divergence"].stable.tolist() == [0.25] * 20
    shadow = w.samples("t", "v1", "v2", 0.0, ALL, shadow=True)
    assert shadow["error_rate"].candidate == Counts(1, 20)
    assert shadow["latency_e2e"].candidate.tolist() == [1.5] * 19
    assert shadow["ttft"].candidate.tolist() == [0.2] * 20
    assert shadow["output_tokens"].candidate.tolist() == [7.0] * 19
    assert shadow["finish_length"].candidate == Counts(0, 0)  # copies carry no finish reason
    judge(ALL, shadow)
    s = w.shadow_summary("t", 0.0)
    assert s["candidate"] == "v2" and s["n"] == 20 and s["errors"] == 1
    assert s["agreement_rate"] == 0.5 and s["mean_llr"] == 0.5
    assert s["noise_floor_mean_llr"] == 0.25 and s["divergence"] == pytest.approx(0.25)
    assert w.shadow_summary("other", 0.0)["n"] == 0


def test_bounded_memory_and_prune():
    clock = Clock(0.0)
    w = MetricWindows(clock=clock, max_samples=100)
    for i in range(1000):
        clock.t = float(i)
        w.record_request("t", "v1", e2e=1.0)
        w.record_request("idle", "v1", e2e=1.0)
        w.record_probe("t", "v1", True)
    assert w.samples("t", "v1", "v2", 0.0, ALL)["error_rate"].stable.total == 100  # the newest 100
    w.prune({"t": 950.0}, default=2000.0)
    assert w.samples("t", "v1", "v2", 0.0, ALL)["error_rate"].stable.total == 50
    assert w.summary("idle", "v1", 0.0)["requests"] == 0
    assert ("idle", "v1") not in w._requests  # empty series are removed


def test_thread_safe_recording():
    w = MetricWindows(clock=Clock())

    def work(k: int) -> None:
        for i in range(2000):
            w.record_request("t", "v1" if i % 2 else "v2", error=i % 10 == 0)
            w.register_completion(f"{k}-{i}", "t", "v1")
            w.record_feedback(f"{k}-{i}", 1.0)
            if i % 100 == 0:
                w.samples("t", "v1", "v2", 0.0, ALL)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = w.samples("t", "v1", "v2", 0.0, ALL)
    assert data["error_rate"].stable.total + data["error_rate"].candidate.total == 8000
    assert len(data["feedback_score"].stable) == 8000


def test_check_metrics_refuses_unknown_names_and_wrong_kinds():
    check_metrics(ALL.metrics)
    assert metric_kind("finish_stop") == "proportion" and metric_kind("finish_") is None
    assert set(METRICS) >= {m.name for m in default_metrics()}
    with pytest.raises(RolloutSpecError, match="unknown metric 'latency_p99'"):
        check_metrics([MetricSpec("latency_p99", "continuous", "increase", 0.1)])
    with pytest.raises(RolloutSpecError, match="is a proportion metric"):
        check_metrics([MetricSpec("error_rate", "continuous", "increase", 0.1)])
    with pytest.raises(ValueError):
        MetricWindows(clock=Clock()).samples(
            "t", "a", "b", 0.0, AnalysisSpec(metrics=(MetricSpec("nope", "continuous", "increase", 1.0),)))


def test_samples_judge_identical_arms_as_pass():
    rng = np.random.default_rng(0)
    w = MetricWindows(clock=Clock())
    for v in ("v1", "v2"):
        for _ in range(300):
            w.record_request("t", v, e2e=float(rng.lognormal(0, 0.3)), ttft=float(rng.lognormal(-2, 0.3)))
            w.record_probe("t", v, bool(rng.random() < 0.9))
    j = judge(AnalysisSpec(), w.samples("t", "v1", "v2", 0.0, AnalysisSpec()))
    assert j.result == "pass", j.reason
