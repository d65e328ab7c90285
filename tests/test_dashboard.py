"""server/dashboard.build_timeline: a rollout's audit records as the page's time series."""

from __future__ import annotations

from typing import Any

from peftserve.server.dashboard import RECENT_EVENTS, build_timeline


def metric(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "continuous",
        "direction": "increase",
        "critical": False,
        **fields,
    }


def event(i: int, at: float, kind: str, **payload: Any) -> dict[str, Any]:
    return {"id": i, "at": at, "kind": kind, "actor": payload.get("actor"), "reason": payload.get("reason"),
            "payload": payload}  # fmt: skip


STATUS = {"task": "t", "rollout_id": 1, "state": "ramping", "active": True, "weight": 25.0,
          "window_started_at": 130.0, "spec": {"step_interval_s": 60.0}}  # fmt: skip


def test_weight_score_and_metric_series_line_up_on_the_judgments() -> None:
    events = [
        event(1, 100.0, "state", to="ramping", weight=10.0, reason="started"),
        event(2, 110.0, "judgment", result="nodata", score=None, metrics=[metric("latency", n_stable=3)]),
        event(3, 110.0, "decision", action="hold", reason="inconclusive"),
        event(4, 120.0, "judgment", result="pass", score=100.0, metrics=[
            metric("latency", n_stable=30, stable_value=1.0, candidate_value=1.1, estimate=0.1,
                   interval=[-0.05, 0.2], tolerance=0.5),
            metric("accuracy", direction="decrease", estimate=-0.01, interval=[-0.03, 0.01], tolerance=0.05),
        ]),  # fmt: skip
        event(5, 130.0, "state", to="ramping", weight=25.0, reason="advanced"),
        # A judge that stores its metrics by name, with fields of its own, is read the same way.
        event(6, 140.0, "judgment", result="pass", score=90.0,
              metrics={"latency": {"stable_interval": [0.9, 1.1], "estimate": 0.05, "verdict": "pass"}}),
    ]  # fmt: skip
    tl = build_timeline(STATUS, events, interval_s=10.0, now=145.0)
    assert tl["weight"]["t"] == [100.0, 110.0, 120.0, 130.0, 140.0, 145.0]
    assert tl["weight"]["weight"] == [10.0, 10.0, 10.0, 25.0, 25.0, 25.0]
    assert tl["score"] == {
        "t": [110.0, 120.0, 140.0],
        "score": [None, 100.0, 90.0],
        "result": ["nodata", "pass", "pass"],
    }
    latency = tl["metrics"]["latency"]
    assert latency["t"] == [110.0, 120.0, 140.0]
    assert latency["series"]["n_stable"] == [3.0, 30.0, None]
    assert latency["series"]["estimate"] == [None, 0.1, 0.05]
    assert latency["series"]["margin"] == [None, 0.5, None]  # + tolerance: harmful increase
    assert latency["bands"]["interval"] == {"lo": [None, -0.05, None], "hi": [None, 0.2, None]}
    assert latency["bands"]["stable_interval"] == {"lo": [None, None, 0.9], "hi": [None, None, 1.1]}
    assert latency["classification"] == [None, None, "pass"]
    assert tl["metrics"]["accuracy"]["series"]["margin"] == [-0.05]  # - tolerance: harmful decrease
    assert tl["next_judgment_at"] == 150.0 and tl["step_due_at"] == 190.0
    assert [e["id"] for e in tl["events"]] == [6, 5, 4, 3, 2, 1]


def test_old_holds_and_judgments_drop_out_of_the_events_but_state_changes_stay() -> None:
    events = [event(1, 0.0, "state", to="ramping", weight=10.0)]
    for i in range(2, 2 + 2 * RECENT_EVENTS, 2):
        events += [event(i, float(i), "judgment", result="nodata", score=None),
                   event(i + 1, float(i), "decision", action="hold")]  # fmt: skip
    paused = {**STATUS, "state": "paused"}
    tl = build_timeline(paused, events, interval_s=10.0, now=1000.0)
    ids = [e["id"] for e in tl["events"]]
    assert len(ids) == RECENT_EVENTS + 1 and ids[-1] == 1
    assert tl["next_judgment_at"] is None and tl["step_due_at"] is None  # paused: nothing is due
