"""deploy/: the Grafana dashboard and the Prometheus alert rules query metrics a live server exports.

Every metric name in the dashboard's queries (panels and variables) and in the alert rules'
expressions must be a sample name in the /metrics of a real server that has served traffic,
run a rollout with probes, judged it and taken feedback: a renamed metric breaks this test
rather than a dashboard nobody looks at until the day it is needed. The committed dashboard
must also be what scripts/make_grafana_dashboard.py writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.server_utils import adapter_parts, running_server, upload_parts, wait_for
from tests.tiny_models import make_peft_adapter, make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "peftserve.json"
RULES = ROOT / "deploy" / "prometheus" / "peftserve-alerts.yml"
METRIC = re.compile(r"\b(?:peftserve|process|python)_[a-zA-Z0-9_]*[a-zA-Z0-9]\b")
TOKEN = "deploy-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    queries += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return queries


def rule_queries() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def names(queries: list[str]) -> set[str]:
    return {m for q in queries for m in METRIC.findall(q)}


def test_dashboard_is_the_generators_output_and_well_formed() -> None:
    import runpy

    generator = runpy.run_path(str(ROOT / "scripts" / "make_grafana_dashboard.py"))
    assert DASHBOARD.read_text() == generator["render"](), "run scripts/make_grafana_dashboard.py"
    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    graphs = [p for p in panels if p["type"] != "row"]
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in graphs)
    titles = " ".join(p["title"].lower() for p in graphs)
    for subject in ("request rate", "error rate", "latency", "first token", "tokens per second", "canary weight",
                    "rollout state", "judgments", "slot", "adapter load", "queue"):  # fmt: skip
        assert subject in titles, subject


def test_alert_rules_are_well_formed() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"PeftserveRolloutRolledBack", "PeftserveRolloutPaused",
                                           "PeftserveServerErrorRateRising"}  # fmt: skip
    for rule in rules:
        assert (
            rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        ), rule
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """The sample names of a server that served, ran a judged rollout with probes and took feedback."""
    model = make_tiny_model(tmp_path_factory.mktemp("model"), "llama")
    folder = tmp_path_factory.mktemp("adapters")
    one = make_peft_adapter(model, folder / "one", std=0.3, seed=1)
    two = make_peft_adapter(model, folder / "two", std=0.3, seed=2)
    flags = {
        "admin_token": TOKEN,
        "canary_interval_s": 0.3,
        "probes_per_tick": 5,
        "probe_max_tokens": 2,
    }
    with running_server(model, served_model_name="base", **flags) as url:
        for version, path in (("v1", one), ("v2", two)):
            assert (
                upload_parts(url, "alpha", version, adapter_parts(path), ADMIN).status_code == 201
            )
        spec = {
            "task": "alpha", "candidate": "v2", "steps": [50], "step_interval_s": 3600,
            "eval_set": [{"prompt": f"p{i}", "answer": "x"} for i in range(10)],
            "analysis": {"min_samples": 10, "metrics": [
                {"name": "probe_accuracy", "kind": "proportion", "direction": "decrease", "tolerance": 0.5},
            ]},
        }  # fmt: skip
        assert (
            httpx.post(f"{url}/admin/rollouts", json=spec, headers=ADMIN, timeout=30).status_code
            == 201
        )
        for i in range(6):
            body = {
                "model": "alpha",
                "prompt": "abc",
                "max_tokens": 4,
                "ignore_eos": True,
                "user": f"u{i}",
            }
            answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            feedback = {"id": answer.json()["id"], "score": i % 2 == 0}
            assert httpx.post(f"{url}/v1/feedback", json=feedback, timeout=10).status_code == 200

        def sample_names() -> set[str]:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            return {s.name for f in text_string_to_metric_families(text) for s in f.samples}

        assert wait_for(lambda: "peftserve_rollout_progress_ratio" in sample_names(), timeout=30)
        yield sample_names()


@pytest.mark.parametrize("source", ["dashboard", "alert rules"])
def test_every_metric_queried_exists_in_a_live_servers_metrics(
    source: str, scraped: set[str]
) -> None:
    queried = names(dashboard_queries() if source == "dashboard" else rule_queries())
    assert queried, "no metric names found: the pattern or the file is wrong"
    missing = sorted(queried - scraped)
    assert not missing, f"{source} queries metrics /metrics does not export: {missing}"


def test_live_metrics_have_the_standard_collectors_and_no_created_series(scraped: set[str]) -> None:
    assert not [name for name in scraped if name.endswith("_created")]
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info",
            "peftserve_canary_probe_accuracy_ratio", "peftserve_canary_feedback_score_ratio"} <= scraped  # fmt: skip
