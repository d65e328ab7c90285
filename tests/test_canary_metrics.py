"""Metric windows: records folded into per-unit sums, feedback attribution, probes per prompt,
the columnar path, memory, thread safety, and the metrics a spec may name."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from peftserve.canary.metrics import (
    COL,
    COLUMNS,
    Columns,
    MetricWindows,
    check_metrics,
    metric_kind,
)
from peftserve.canary.samples import (
    BatchShare,
    ProbeRecord,
    RequestRecord,
    length_bucket,
    segment_labels,
    stratum_of,
    unit_id,
)
from peftserve.canary.spec import MetricSpec, RolloutSpecError


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def rec(version: str, user: str, **kw) -> RequestRecord:
    kw.setdefault("finish_reason", "stop")
    return RequestRecord("t", version, unit_id(f"user:{user}"), kw.pop("stratum", "10%"), kw.pop("at", 1.0), **kw)


def test_records_are_self_describing_and_travel_as_json():
    r = rec("v2", "ann", arm="candidate", e2e=0.5, ttft=float("nan"), segments=("meta:tier=gold",),
            batch=BatchShare(4, 0.08, 40, stable_steps=4, stable_tokens=30, candidate_steps=4, candidate_tokens=10))
    assert r.ttft is None  # a non-finite timing is never judged
    again = RequestRecord.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r
    p = ProbeRecord("t", "v2", 3, 1.0, 2.0, r)
    assert ProbeRecord.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert p.step_time == pytest.approx(0.02)
    assert RequestRecord("t", "v", 1, "1%", 0.0, non_finite=True).error  # non-finite implies error
    assert stratum_of(0) == "shadow" and stratum_of(12.5) == "12.5%"
    assert [length_bucket(n) for n in (3, 64, 300, 5000)] == ["length=0-63", "length=64-255", "length=256-1023",
                                                              "length>=1024"]
    assert segment_labels(10, {"X-Tier": " gold "}, {"team": "a"}) == ("length=0-63", "header:x-tier=gold",
                                                                        "meta:team=a")


def test_only_experiment_requests_are_judged_and_units_are_shared_by_both_arms():
    w = MetricWindows()
    w.record(rec("v1", "ann", error=True))
    w.record(rec("v1", "ann"))
    w.record(rec("v1", "bob", in_experiment=False))  # pinned: shown, not judged
    w.record(rec("v2", "ann", stratum="25%"))  # ann moved to the candidate at 25 %
    ev = w.evidence("t", "v1", "v2")
    s = ev.arm("v1", "errors", "requests")
    assert s.samples == 2 and s.units == 1 and s.total.sum() == 1
    c = ev.arm("v2", "errors", "requests")
    assert c.unit.tolist() == s.unit.tolist()  # the same user is one cluster in both arms
    assert ev.strata == {"10%": 0, "25%": 1}
    summary = w.summary("t", "v1")
    assert summary["requests"] == 3 and summary["in_experiment"] == 2 and summary["errors"] == 1


def test_feedback_counts_for_the_answering_version_unit_and_segment():
    clock = Clock()
    w = MetricWindows(clock=clock, feedback_ttl_s=60.0)
    r = rec("v2", "ann", segments=("meta:tier=gold",))
    w.record(r)
    w.register_completion("c1", r)
    assert w.record_feedback("c1", 0.4)
    assert w.record_feedback("c1", True)  # a second score replaces the first
    assert not w.record_feedback("nope", 1.0)
    with pytest.raises(ValueError):
        w.record_feedback("c1", 1.5)
    ev = w.evidence("t", "v1", "v2")
    fb = ev.arm("v2", "feedback", "feedback_n")
    assert fb.samples == 1 and fb.total.sum() == 1.0
    gold = ev.segments["meta:tier=gold"]
    assert ev.arm("v2", "feedback", "feedback_n", gold).samples == 1
    assert ev.total("v2", "feedback_graded") == 0  # 0.4 was replaced: all binary now
    clock.t += 61
    assert not w.record_feedback("c1", 1.0)  # expired


def test_probes_pair_by_prompt_and_carry_the_engine_time():
    w = MetricWindows()
    for version, scores in (("v1", [1, 1, 0]), ("v2", [1, 0])):
        for i, s in enumerate(scores):
            req = RequestRecord("t", version, 0, "probe", 0.0, batch=BatchShare(10, 0.2 if version == "v2" else 0.1, 0))
            w.record_probe(ProbeRecord("t", version, i, float(s), 0.0, req))
    w.record_probe(ProbeRecord("t", "v1", 1, None, 0.0, None))  # latency-only, untimed: counts nowhere
    ev = w.evidence("t", "v1", "v2")
    idx, s, c = ev.paired_probes()
    assert idx.tolist() == [0, 1] and s.tolist() == [1.0, 1.0] and c.tolist() == [1.0, 0.0]
    _, s_t, c_t = ev.paired_probes(latency=True)
    assert np.allclose(np.exp(c_t - s_t), 2.0)
    assert ev.arm("v2", "errors", "requests").samples == 2  # probes are requests too (stratum probe)
    assert w.summary("t", "v1")["probe_prompts"] == 3


def test_columns_and_records_fold_into_the_same_sums():
    by_record, by_column = MetricWindows(), MetricWindows()
    rng = np.random.default_rng(0)
    users = rng.integers(0, 50, 300)
    errors = rng.random(300) < 0.1
    for u, e in zip(users.tolist(), errors.tolist(), strict=True):
        by_record.record(rec("v1", str(u), error=e, e2e=None if e else 0.2, segments=(f"meta:g={u % 3}",)))
    values = np.zeros((300, len(COLUMNS)))
    values[:, COL["requests"]] = 1
    values[:, COL["errors"]] = errors
    values[:, COL["completed"]] = ~errors
    values[:, COL["e2e_n"]] = ~errors
    values[:, COL["e2e"]] = np.where(errors, 0, 0.2)
    values[:, COL["finish_stop"]] = ~errors
    values[:, COL["finish_error"]] = errors
    by_column.record_columns(Columns(
        "t", "v1", "stable", "10%", np.array([unit_id(f"user:{u}") for u in users.tolist()]), values,
        np.ones(300, bool), np.ones(300), [np.array([f"meta:g={u % 3}" for u in users.tolist()])]))
    a, b = by_record.evidence("t", "v1", "v2"), by_column.evidence("t", "v1", "v2")
    for seg in ("", "meta:g=1"):
        x = a.arm("v1", "errors", "requests", a.segments[seg])
        y = b.arm("v1", "errors", "requests", b.segments[seg])
        assert x.samples == y.samples and x.total.sum() == y.total.sum() and x.units == y.units


def test_forget_starts_a_rollout_afresh_and_fold_bounds_pending_records():
    w = MetricWindows()
    w.record(rec("v1", "ann"))
    w.forget("t")
    assert w.evidence("t", "v1", "v2").tables == {}
    for i in range(100):
        w.record(rec("v1", f"u{i}", in_experiment=False))
    w.fold()
    assert not w._pending and w.summary("t", "v1")["requests"] == 100


def test_recent_rate_counts_the_last_five_minutes():
    clock = Clock()
    w = MetricWindows(clock=clock)
    for i in range(600):
        w.record(rec("v1", "u", at=clock.t - 300 + i * 0.5))
    assert w.recent_rate("t") == pytest.approx(2.0, rel=0.1)
    assert w.recent_rate("other") == 0.0
    clock.t += 3600
    assert w.recent_rate("t") == 0.0


def test_thread_safe_recording():
    w = MetricWindows()

    def send(k: int) -> None:
        for i in range(500):
            w.record(rec("v1", f"{k}-{i % 20}", error=i % 10 == 0))

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    arm = w.evidence("t", "v1", "v2").arm("v1", "errors", "requests")
    assert arm.samples == 4000 and arm.total.sum() == 400 and arm.units == 160


def test_check_metrics_refuses_unknown_names_and_wrong_kinds():
    check_metrics([MetricSpec("finish_length", "proportion", "increase", 0.05)])
    assert metric_kind("latency") == "continuous" and metric_kind("finish_bogus") is None
    with pytest.raises(RolloutSpecError, match="unknown metric"):
        check_metrics([MetricSpec("vibes", "continuous", "increase", 0.1)])
    with pytest.raises(RolloutSpecError, match="is a continuous metric"):
        check_metrics([MetricSpec("ttft", "proportion", "increase", 0.1)])
    with pytest.raises(RolloutSpecError, match="relative"):
        check_metrics([MetricSpec("latency", "continuous", "increase", 0.1)])
