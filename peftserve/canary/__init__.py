"""Canary rollouts: specs, router, metric windows, statistical judge, store and controller.

The names below are imported lazily (PEP 562): ``import peftserve.canary.router`` stays light,
while ``from peftserve.canary import RolloutController`` pulls in the store (and with it the
registry package) only when asked.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "ControllerConfig": "controller",
    "ControllerHooks": "controller",
    "PendingUnload": "controller",
    "RolloutController": "controller",
    "RolloutNotFoundError": "controller",
    "deciding_metric": "controller",
    "ProbeAnswer": "controller",
    "Decision": "judge",
    "Judgment": "judge",
    "MetricResult": "judge",
    "decide": "judge",
    "METRICS": "metrics",
    "Evidence": "metrics",
    "MetricWindows": "metrics",
    "check_metrics": "metrics",
    "metric_kind": "metrics",
    "plan_rollout": "plan",
    "BatchShare": "samples",
    "ProbeRecord": "samples",
    "RequestRecord": "samples",
    "RouteDecision": "router",
    "Router": "router",
    "RoutingError": "router",
    "AnalysisSpec": "spec",
    "DecisionPolicy": "spec",
    "MetricSpec": "spec",
    "Rollout": "spec",
    "RolloutConflictError": "spec",
    "RolloutSpec": "spec",
    "RolloutSpecError": "spec",
    "TargetingRule": "spec",
    "check_registry": "spec",
    "default_metrics": "spec",
    "Event": "store",
    "RolloutStore": "store",
    "ensure_schema": "store",
}

__all__ = [
    "AnalysisSpec",
    "BatchShare",
    "ControllerConfig",
    "ControllerHooks",
    "Decision",
    "DecisionPolicy",
    "Event",
    "Evidence",
    "Judgment",
    "METRICS",
    "MetricResult",
    "MetricSpec",
    "MetricWindows",
    "PendingUnload",
    "ProbeAnswer",
    "ProbeRecord",
    "RequestRecord",
    "Rollout",
    "RolloutConflictError",
    "RolloutController",
    "RolloutNotFoundError",
    "RolloutSpec",
    "RolloutSpecError",
    "RolloutStore",
    "RouteDecision",
    "Router",
    "RoutingError",
    "TargetingRule",
    "check_metrics",
    "check_registry",
    "decide",
    "deciding_metric",
    "default_metrics",
    "ensure_schema",
    "metric_kind",
    "plan_rollout",
]
# ``judge`` (the function) is not re-exported: the name belongs to the submodule
# ``peftserve.canary.judge``; exporting both made ``from peftserve.canary import judge``
# depend on import order.

if TYPE_CHECKING:
    from peftserve.canary.controller import (
        ControllerConfig,
        ControllerHooks,
        PendingUnload,
        ProbeAnswer,
        RolloutController,
        RolloutNotFoundError,
        deciding_metric,
    )
    from peftserve.canary.judge import Decision, Judgment, MetricResult, decide
    from peftserve.canary.metrics import (
        METRICS,
        Evidence,
        MetricWindows,
        check_metrics,
        metric_kind,
    )
    from peftserve.canary.plan import plan_rollout
    from peftserve.canary.router import RouteDecision, Router, RoutingError
    from peftserve.canary.samples import BatchShare, ProbeRecord, RequestRecord
    from peftserve.canary.spec import (
        AnalysisSpec,
        DecisionPolicy,
        MetricSpec,
        Rollout,
        RolloutConflictError,
        RolloutSpec,
        RolloutSpecError,
        TargetingRule,
        check_registry,
        default_metrics,
    )
    from peftserve.canary.store import Event, RolloutStore, ensure_schema


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
