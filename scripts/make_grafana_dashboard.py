"""Write deploy/grafana/peftserve.json, the Grafana dashboard of peftserve's /metrics.

    python scripts/make_grafana_dashboard.py            # rewrites the file
    python scripts/make_grafana_dashboard.py --check    # exit 1 if the file differs

The dashboard is generated so that its panels stay uniform (one query style, one layout rule);
tests/test_deploy.py checks that the committed file is this script's output and that every
metric it queries exists in a live server's /metrics. Import it in Grafana (Dashboards ->
New -> Import) and pick a Prometheus data source for the ``datasource`` variable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "peftserve.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'task=~"$task", version=~"$version"'
"""The dashboard's task and version filters, for series labelled with both."""
USER = f'{SEL}, arm!="shadow"'
"""User traffic: shadow copies (run on the candidate for comparison, never answered) left out."""
RATE = "$__rate_interval"


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(
    title: str,
    kind: str,
    targets: list[tuple[str, str]],
    unit: str = "short",
    *,
    w: int = 8,
    h: int = 8,
    description: str = "",
    **options: Any,
) -> dict[str, Any]:
    refs = "ABCDEFGH"
    body: dict[str, Any] = {
        "title": title,
        "type": kind,
        "datasource": DS,
        "description": description,
        "gridPos": {"w": w, "h": h},
        "targets": [target(expr, legend, refs[i]) for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "multi"},
        },
    }
    body["fieldConfig"]["defaults"].update(options.pop("defaults", {}))
    body["options"].update(options)
    return body


def quantiles(metric: str, by: str = "task, version") -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{USER}}}[{RATE}])))",
            f"p{int(q * 100)} {{{{task}}}}@{{{{version}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def row(title: str) -> dict[str, Any]:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"w": 24, "h": 1},
        "panels": [],
    }


def traffic() -> list[dict[str, Any]]:
    requests = "peftserve_requests_total"
    return [
        row("Traffic"),
        panel(
            "Request rate by version and arm",
            "timeseries",
            [
                (
                    f"sum by (task, version, arm) (rate({requests}{{{SEL}}}[{RATE}]))",
                    "{{task}}@{{version}} {{arm}}",
                ),
            ],
            "reqps",
            w=12,
            description="Requests per second; arm is stable, candidate, pinned or shadow "
            "(copies run on the candidate, never answered).",
        ),
        panel(
            "Error rate (server errors, as the judge counts them; client errors apart)",
            "timeseries",
            [
                (
                    f'sum by (task, version) (rate({requests}{{{USER}, outcome="server_error"}}[{RATE}])) / '
                    f"sum by (task, version) (rate({requests}{{{USER}}}[{RATE}]))",
                    "5xx {{task}}@{{version}}",
                ),
                (
                    f'sum by (task, version) (rate({requests}{{{USER}, outcome="client_error"}}[{RATE}])) / '
                    f"sum by (task, version) (rate({requests}{{{USER}}}[{RATE}]))",
                    "4xx {{task}}@{{version}}",
                ),
            ],
            "percentunit",
            w=12,
        ),
        panel(
            "End-to-end latency",
            "timeseries",
            quantiles("peftserve_e2e_request_latency_seconds"),
            "s",
        ),
        panel(
            "Time to first token",
            "timeseries",
            quantiles("peftserve_time_to_first_token_seconds"),
            "s",
        ),
        panel(
            "Time per output token",
            "timeseries",
            quantiles("peftserve_time_per_output_token_seconds"),
            "s",
        ),
        panel(
            "Tokens per second",
            "timeseries",
            [
                (
                    f"sum by (task, version) (rate(peftserve_generation_tokens_total{{{USER}}}[{RATE}]))",
                    "generated {{task}}@{{version}}",
                ),
                (
                    f"sum by (task, version) (rate(peftserve_prompt_tokens_total{{{USER}}}[{RATE}]))",
                    "prompt {{task}}@{{version}}",
                ),
            ],
            "short",
            w=24,
            h=7,
        ),
    ]


def rollouts() -> list[dict[str, Any]]:
    task = 'task=~"$task"'
    return [
        row("Rollouts"),
        panel(
            "Canary weight",
            "timeseries",
            [(f"peftserve_canary_weight_ratio{{{task}}}", "{{task}}")],
            "percentunit",
            defaults={"min": 0, "max": 1, "custom": {"lineInterpolation": "stepAfter"}},
        ),
        panel(
            "Rollout state",
            "state-timeline",
            [
                (
                    f"max by (task, state) (peftserve_rollout_state{{{task}}}) == 1",
                    "{{task}} {{state}}",
                ),
            ],
            "short",
            showValue="never",
            mergeValues=True,
        ),
        panel(
            "Progress toward the next decision",
            "timeseries",
            [
                (f"peftserve_rollout_progress_ratio{{{task}}}", "{{task}}"),
            ],
            "percentunit",
            defaults={"min": 0, "max": 1},
        ),
        panel(
            "Judgments by result",
            "timeseries",
            [
                (
                    f"sum by (task, result) (increase(peftserve_rollout_judgments_total{{{task}}}[5m]))",
                    "{{task}} {{result}}",
                ),
            ],
            "short",
            w=12,
            defaults={"custom": {"drawStyle": "bars", "stacking": {"mode": "normal"}}},
        ),
        panel(
            "Controller decisions by action",
            "timeseries",
            [
                (
                    f"sum by (task, action) (increase(peftserve_rollout_decisions_total{{{task}}}[5m]))",
                    "{{task}} {{action}}",
                ),
            ],
            "short",
            w=12,
            defaults={"custom": {"drawStyle": "bars", "stacking": {"mode": "normal"}}},
        ),
        panel(
            "Probe accuracy per arm (the rollout)",
            "timeseries",
            [
                (
                    f"peftserve_canary_probe_accuracy_ratio{{{SEL}}}",
                    "{{task}} {{arm}} ({{version}})",
                ),
            ],
            "percentunit",
            w=12,
            defaults={"min": 0, "max": 1},
        ),
        panel(
            "Feedback score per arm (the rollout)",
            "timeseries",
            [
                (
                    f"peftserve_canary_feedback_score_ratio{{{SEL}}}",
                    "{{task}} {{arm}} ({{version}})",
                ),
            ],
            "percentunit",
            w=12,
            defaults={"min": 0, "max": 1},
        ),
    ]


def engine() -> list[dict[str, Any]]:
    return [
        row("Engine"),
        panel(
            "Adapter slot occupancy",
            "timeseries",
            [
                (
                    "sum by (instance, device) (peftserve_adapter_slots_used) / "
                    "sum by (instance, device) (peftserve_adapter_slots)",
                    "{{instance}} slots on {{device}}",
                ),
            ],
            "percentunit",
            defaults={"min": 0, "max": 1},
            description="Adapter slots holding an adapter; device says where the slots are (cuda, or cpu "
            "on a CPU server).",
        ),
        panel(
            "Adapters by tier",
            "timeseries",
            [
                ("sum by (tier) (peftserve_adapters)", "{{tier}}"),
            ],
            "short",
            defaults={"custom": {"stacking": {"mode": "normal"}}},
        ),
        panel(
            "Adapter load latency",
            "timeseries",
            [
                (
                    f"histogram_quantile({q}, sum by (le, source) (rate(peftserve_adapter_load_seconds_bucket[{RATE}])))",
                    f"p{int(q * 100)} from {{{{source}}}}",
                )
                for q in (0.5, 0.95)
            ],
            "s",
        ),
        panel(
            "Queue depth and running sequences",
            "timeseries",
            [
                ("sum by (instance) (peftserve_queue_depth)", "queued {{instance}}"),
                ("sum by (instance) (peftserve_num_requests_running)", "running {{instance}}"),
            ],
            "short",
        ),
        panel(
            "KV cache in use",
            "timeseries",
            [
                (
                    "sum by (instance, device) (peftserve_kv_cache_blocks_used) / "
                    "sum by (instance, device) (peftserve_kv_cache_blocks)",
                    "{{instance}} {{device}}",
                ),
            ],
            "percentunit",
            defaults={"min": 0, "max": 1},
        ),
        panel(
            "Process",
            "timeseries",
            [
                ("process_resident_memory_bytes", "resident {{instance}}"),
            ],
            "bytes",
        ),
    ]


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Place panels left to right, wrapping at 24 columns; rows start a new line."""
    x = y = line = 0
    for i, p in enumerate(panels, start=1):
        g = p["gridPos"]
        if p["type"] == "row" or x + g["w"] > 24:
            x, y, line = 0, y + line, 0
        g.update(x=x, y=y)
        p["id"] = i
        x += g["w"]
        line = max(line, g["h"])
        if p["type"] == "row":
            x, y, line = 0, y + g["h"], 0
    return panels


def variable(name: str, query: str, label: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": query,
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    return {
        "title": "peftserve",
        "uid": "peftserve",
        "description": "One base model, many LoRA adapters, canary rollouts: traffic per version and arm, "
        "rollouts, engine. From peftserve's /metrics (deploy/README.md).",
        "tags": ["peftserve", "llm", "lora"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                variable("task", "label_values(peftserve_requests_total, task)", "task"),
                variable(
                    "version",
                    'label_values(peftserve_requests_total{task=~"$task"}, version)',
                    "version",
                ),
            ]
        },
        "annotations": {"list": []},
        "panels": layout([*traffic(), *rollouts(), *engine()]),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        same = OUT.exists() and OUT.read_text() == text
        print(
            f"{OUT}: {'up to date' if same else 'differs; run scripts/make_grafana_dashboard.py'}"
        )
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
