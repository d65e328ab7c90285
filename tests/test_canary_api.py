"""Canary rollouts through the server, over real HTTP: routing headers, pins, X-Canary for admins
only, targeting, the canary cohort, feedback, the admin rollout routes and the client, a
non-finite candidate rolled back while stable answers for it, shadow copies, /metrics, and a
SIGKILL during a rollout that resumes where it was."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from peftserve.api.auth import is_admin, require_api_key
from peftserve.api.errors import install_error_handlers
from peftserve.canary.router import RouteDecision, bucket, routing_key, threshold
from peftserve.client import Client, PeftserveError
from peftserve.engine.engine import AsyncLLMEngine, QueueFull
from peftserve.engine.sampling_params import SamplingParams
from peftserve.server.canary import CanaryRuntime, InternalResult
from peftserve.server.model_table import Target
from tests.server_utils import running_server, wait_for
from tests.tiny_models import make_peft_adapter, make_tiny_model

TOKEN = "canary-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
FAST = {"canary_interval_s": 0.2, "rollback_keep_warm_s": 0}
"""Controller rounds every 0.2 s, so decisions come within a second; rolled-back candidates go at once."""
QUICK_ANALYSIS = {
    "min_samples": 10,
    "metrics": [
        {"name": "error_rate", "kind": "proportion", "direction": "increase", "tolerance": 0.0, "mde": 0.05},
        {"name": "non_finite", "kind": "proportion", "direction": "increase", "tolerance": 0.0, "mde": 0.05},
    ],
}
"""Errors only: latency has its own test (tests/test_canary_latency_http.py)."""
HAS_SCORE = hasattr(AsyncLLMEngine, "score")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), "llama")


def overflowing_adapter(model_dir: Path, out: Path) -> Path:
    """An adapter accepted at upload whose answers are not finite: gate_proj and up_proj with
    A and B each scaled by 1e10.

    Each module's delta is far inside the range rule (docs/adapters.md: about 1e22 for a
    unit-norm row, the limit is 3.4e38), but SwiGLU multiplies the two projections, and their
    product overflows float32. (A single projection scaled past the rule, such as A and B x 1e20,
    is refused at upload.)
    """
    make_peft_adapter(model_dir, out, seed=9, std=0.3, target_modules=["gate_proj", "up_proj"])
    weights = load_file(out / "adapter_model.safetensors")
    save_file({k: v * 1e10 for k, v in weights.items()}, out / "adapter_model.safetensors")
    return out


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "one": make_peft_adapter(model_dir, root / "one", seed=1, std=0.3),
        "two": make_peft_adapter(model_dir, root / "two", seed=2, std=0.3),
        "nan": overflowing_adapter(model_dir, root / "nan"),
    }


UPLOADS = {
    "alpha": [("v1", "one"), ("v2", "two")],
    "tgt": [("v1", "one"), ("v2", "two")],
    "steer": [("v1", "one"), ("v2", "two")],
    "nan": [("v1", "one"), ("bad", "nan")],
    "nanstream": [("v1", "one"), ("bad", "nan")],
    "shadow": [("v1", "one"), ("same", "one"), ("diff", "two")],
}


@pytest.fixture(scope="module")
def url(model_dir: Path, adapters: dict[str, Path]) -> Iterator[str]:
    with running_server(model_dir, served_model_name="base", admin_token=TOKEN, **FAST) as base_url:
        with Client(base_url, admin_token=TOKEN) as client:
            for task, versions in UPLOADS.items():
                for version, name in versions:
                    client.upload(adapters[name], task, version)
        yield base_url


@pytest.fixture
def client(url: str) -> Iterator[Client]:
    with Client(url, admin_token=TOKEN) as c:
        yield c


def complete(url: str, model: str, user: str | None = None, headers: dict[str, str] | None = None,
             prompt: str = "abc", max_tokens: int = 4, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    if user is not None:
        body["user"] = user
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)


def served(response: httpx.Response) -> tuple[str, str]:
    assert response.status_code == 200, response.text
    return response.headers["x-peftserve-version"], response.headers["x-peftserve-arm"]


def text(response: httpx.Response) -> str:
    return response.json()["choices"][0]["text"]


def in_cohort(task: str, user: str, weight: float) -> bool:
    return bucket(task, routing_key(user, {}, "")) < threshold(weight)


def users(task: str, weight: float, inside: bool, n: int = 1) -> list[str]:
    found = [f"user-{i}" for i in range(2000) if in_cohort(task, f"user-{i}", weight) == inside]
    return found[:n]


def start(url: str, task: str, candidate: str, **spec: Any) -> httpx.Response:
    body = {"task": task, "candidate": candidate, "step_interval_s": 3600, "analysis": QUICK_ANALYSIS, **spec}
    return httpx.post(f"{url}/admin/rollouts", json=body, headers=ADMIN, timeout=60)


def error(response: httpx.Response, status: int, code: str | None, *needles: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    for needle in needles:
        assert needle in err["message"], err["message"]
    return err


@pytest.fixture(scope="module")
def alpha(url: str) -> Iterator[dict[str, Any]]:
    """alpha: v1 -> v2 sitting at 25 % (the interval is an hour)."""
    response = start(url, "alpha", "v2", steps=[25, 50])
    assert response.status_code == 201, response.text
    yield response.json()
    httpx.post(f"{url}/admin/rollouts/alpha/rollback", headers=ADMIN, timeout=30)


# ---- the request path ---------------------------------------------------------------------------


def test_every_response_names_its_version_streaming_too(url: str, alpha: dict[str, Any]) -> None:
    inside, outside = users("alpha", 25, True)[0], users("alpha", 25, False)[0]
    assert served(complete(url, "alpha", inside)) == ("alpha@v2", "candidate")
    assert served(complete(url, "alpha", outside)) == ("alpha@v1", "stable")
    assert served(complete(url, "base")) == ("base", "stable")
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "alpha", "user": inside, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert served(chat) == ("alpha@v2", "candidate")
    body = {"model": "alpha", "prompt": "abc", "max_tokens": 3, "user": outside, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
        assert stream.headers["x-peftserve-version"] == "alpha@v1"
        assert stream.headers["x-peftserve-arm"] == "stable"
        assert any(line == "data: [DONE]" for line in stream.iter_lines())
    refused = complete(url, "alpha", outside, max_tokens=10_000)
    error(refused, 400, None)
    assert refused.headers["x-peftserve-version"] == "alpha@v1"


def test_session_header_routes_like_a_user(url: str, alpha: dict[str, Any]) -> None:
    for i in range(20):
        session = f"session-{i}"
        expected = bucket("alpha", f"session:{session}") < threshold(25)
        version, arm = served(complete(url, "alpha", headers={"X-Session-Id": session}, max_tokens=1))
        assert (arm == "candidate") == expected and version == ("alpha@v2" if expected else "alpha@v1")


def test_pins_serve_the_named_version(url: str, alpha: dict[str, Any]) -> None:
    outside = users("alpha", 25, False)[0]
    assert served(complete(url, "alpha@v2", outside)) == ("alpha@v2", "pinned")  # as its metrics say
    assert served(complete(url, "alpha@v1", users("alpha", 25, True)[0])) == ("alpha@v1", "pinned")
    error(complete(url, "alpha@v9"), 404, "model_not_found")


def test_x_canary_counts_for_admins_only(url: str, alpha: dict[str, Any]) -> None:
    inside, outside = users("alpha", 25, True)[0], users("alpha", 25, False)[0]
    always, never = {"X-Canary": "always"}, {"X-Canary": "never"}
    assert served(complete(url, "alpha", outside, always))[1] == "stable"  # ignored: no token
    assert served(complete(url, "alpha", inside, never))[1] == "candidate"
    assert served(complete(url, "alpha", outside, {**always, **ADMIN}))[1] == "candidate"
    assert served(complete(url, "alpha", inside, {**never, **ADMIN}))[1] == "stable"
    wrong = {"Authorization": "Bearer not-the-token", **always}
    assert served(complete(url, "alpha", outside, wrong))[1] == "stable"
    error(complete(url, "alpha", outside, {"X-Canary": "sometimes", **ADMIN}), 400, None, "X-Canary")


def test_no_user_outside_the_cohort_gets_the_candidate(url: str, alpha: dict[str, Any]) -> None:
    arms = {f"u{i}": served(complete(url, "alpha", f"u{i}", max_tokens=1))[1] for i in range(200)}
    expected = {u: "candidate" if in_cohort("alpha", u, 25) else "stable" for u in arms}
    assert arms == expected
    assert 20 < sum(a == "candidate" for a in arms.values()) < 80  # about a quarter


def test_targeting_header_restricts_the_cohort(url: str) -> None:
    targeting = [{"header": "x-tier", "values": ["internal", "beta"], "op": "in"}]
    assert start(url, "tgt", "v2", steps=[50], targeting=targeting).status_code == 201
    try:
        for i in range(30):
            user = f"t{i}"
            assert served(complete(url, "tgt", user, max_tokens=1))[1] == "stable"
            assert served(complete(url, "tgt", user, {"X-Tier": "public"}, max_tokens=1))[1] == "stable"
            arm = served(complete(url, "tgt", user, {"X-Tier": "beta"}, max_tokens=1))[1]
            assert arm == ("candidate" if in_cohort("tgt", user, 50) else "stable")
    finally:
        httpx.post(f"{url}/admin/rollouts/tgt/rollback", headers=ADMIN, timeout=30)


def test_feedback_200_404_400(url: str, client: Client, alpha: dict[str, Any]) -> None:
    inside = users("alpha", 25, True)[0]
    answer = complete(url, "alpha", inside)
    completion_id = answer.json()["id"]
    post = lambda body: httpx.post(f"{url}/v1/feedback", json=body, timeout=10)  # noqa: E731
    ok = post({"id": completion_id, "score": 0.75})
    assert ok.status_code == 200 and ok.json() == {"object": "feedback", "id": completion_id, "score": 0.75}
    assert client.feedback(completion_id, True).score == 1.0
    error(post({"id": "cmpl-unknown", "score": 1}), 404, "completion_not_found", "cmpl-unknown")
    for bad in (1.5, -0.1, "good", None, [1]):
        assert error(post({"id": completion_id, "score": bad}), 400, None, "score")["param"] == "score"
    assert error(post({"id": completion_id}), 400, None)["param"] == "score"
    assert error(post({"score": 1}), 400, None)["param"] == "id"
    error(httpx.post(f"{url}/v1/feedback", content=b"{", timeout=10), 400, "invalid_json")
    with pytest.raises(PeftserveError) as caught:
        client.feedback("cmpl-nope", 0.5)
    assert caught.value.status == 404
    status = client.rollout("alpha")
    assert status.arms["candidate"]["feedback"] >= 1


def test_a_candidate_that_raises_is_answered_by_stable(
    url: str, client: Client, alpha: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only engine errors: any exception of a candidate attempt falls back (counted once)."""
    from peftserve.api import openai_routes

    real = openai_routes.open_stream

    async def flaky(engine: Any, request_id: str, prompt_ids: list[int], params: Any, lora_id: str | None,
                    observer: Any = None) -> Any:
        if lora_id == "alpha@v2":
            raise RuntimeError("candidate exploded")
        return await real(engine, request_id, prompt_ids, params, lora_id, observer)

    inside = users("alpha", 25, True)[0]
    expected = text(complete(url, "alpha@v1"))
    errors_before = client.rollout("alpha").arms["candidate"]["errors"]
    monkeypatch.setattr(openai_routes, "open_stream", flaky)
    response = complete(url, "alpha", inside)
    assert served(response) == ("alpha@v1", "stable") and text(response) == expected
    body = {"model": "alpha", "prompt": "abc", "max_tokens": 4, "temperature": 0, "user": inside, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
        assert stream.headers["x-peftserve-version"] == "alpha@v1"
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == expected
    error(complete(url, "alpha@v2", inside), 500, "internal_error")  # a pin gets the error it asked for
    monkeypatch.undo()
    assert client.rollout("alpha").arms["candidate"]["errors"] == errors_before + 2


def test_the_admin_token_works_on_v1_when_api_keys_are_set() -> None:
    app = FastAPI()
    app.state.serving = SimpleNamespace(api_keys=("key",), admin_token=TOKEN)
    install_error_handlers(app)

    @app.get("/who", dependencies=[Depends(require_api_key)])
    async def who(request: Request) -> dict[str, bool]:
        return {"admin": is_admin(request)}

    async def ask(token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport = httpx.ASGITransport(app=app, client=("10.0.0.7", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as http:
            return await http.get("/who", headers=headers)

    assert asyncio.run(ask("key")).json() == {"admin": False}
    assert asyncio.run(ask(TOKEN)).json() == {"admin": True}
    assert asyncio.run(ask("wrong")).status_code == 401
    assert asyncio.run(ask(None)).status_code == 401


# ---- admin routes and the client ----------------------------------------------------------------


def test_invalid_specs_are_400_and_a_second_rollout_409(url: str, alpha: dict[str, Any]) -> None:
    error(start(url, "steer", "v2", steps=[50, 10]), 400, "invalid_rollout", "strictly increasing")
    error(start(url, "steer", "v9"), 400, "invalid_rollout", "unknown candidate version 'v9'")
    error(start(url, "nope", "v2"), 400, "invalid_rollout", "unknown task 'nope'")
    error(start(url, "steer", "v1"), 400, "invalid_rollout", "candidate and stable are both")
    error(start(url, "steer", "v2", colour="red"), 400, "invalid_rollout", "unknown field(s) in rollout: colour")
    error(start(url, "steer", "v2", eval_set="{not json\n"), 400, "invalid_rollout", "eval_set line 1")
    error(start(url, "steer", "v2", stable="v2"), 400, "invalid_rollout")
    probes = {"min_samples": 10, "metrics": [
        {"name": "probe_accuracy", "kind": "proportion", "direction": "decrease", "tolerance": 0.05}]}
    error(start(url, "steer", "v2", analysis=probes), 400, "invalid_rollout", "eval set")
    error(start(url, "alpha", "v2", steps=[5]), 409, "rollout_conflict", "already has an active rollout")
    no_body = httpx.post(f"{url}/admin/rollouts", content=b"[]", headers=ADMIN, timeout=10)
    error(no_body, 400, None, "JSON object")
    unauthorized = httpx.post(f"{url}/admin/rollouts", json={"task": "steer", "candidate": "v2"}, timeout=10)
    assert unauthorized.status_code == 401


def test_start_status_history_pause_resume_promote_rollback_retry(url: str, client: Client) -> None:
    created = start(url, "steer", "v2", steps=[10, 20], reason="first try")
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["state"], body["weight"], body["stable"], body["candidate"]) == ("ramping", 10.0, "v1", "v2")
    assert "steer: v1 -> v2 ramping at 10 %" in body["summary"]
    deleted = httpx.delete(f"{url}/admin/adapters/steer/v2", headers=ADMIN, timeout=10)
    error(deleted, 409, None, "active rollout")

    assert wait_for(lambda: client.rollout("steer").last_judgment is not None, timeout=10)
    status = client.rollout("steer")
    assert status.last_judgment.result == "nodata" and status.last_judgment.reason
    assert status.last_decision["action"] == "hold"
    assert client.pause_rollout("steer", "looking").state == "paused"
    with pytest.raises(PeftserveError) as caught:
        client.pause_rollout("steer")
    assert caught.value.status == 409 and "already paused" in caught.value.message
    assert client.resume_rollout("steer").state == "ramping"
    promoted = client.promote_rollout("steer", "looks fine")
    assert (promoted.state, promoted.weight, promoted.active) == ("promoted", 100.0, False)
    assert client.task("steer").stable == "v2"
    assert served(complete(url, "steer", "anyone"))[0] == "steer@v2"
    with pytest.raises(PeftserveError) as caught:
        client.rollback_rollout("steer")
    assert caught.value.status == 404 and caught.value.code == "rollout_not_found"

    restarted = client.start_rollout("steer", "v1", steps=[10], interval=3600, analysis=QUICK_ANALYSIS)
    assert (restarted.stable, restarted.candidate, restarted.state) == ("v2", "v1", "ramping")
    assert client.rollback_rollout("steer").state == "rolled_back"
    assert client.retry_rollout("steer", "again").state == "ramping"
    assert client.rollback_rollout("steer").state == "rolled_back"
    assert [r.task for r in client.rollouts() if r.task == "steer"] == ["steer"]

    states = [(e.state_from, e.state_to) for e in client.rollout_history("steer", kinds=["state"])]
    assert states == [(None, "ramping"), ("ramping", "paused"), ("paused", "ramping"), ("ramping", "promoted"),
                      (None, "ramping"), ("ramping", "rolled_back"), (None, "ramping"), ("ramping", "rolled_back")]
    raw = httpx.get(f"{url}/admin/rollouts/steer/history", params={"kind": "state", "limit": 2}, headers=ADMIN)
    assert raw.status_code == 200 and [e["kind"] for e in raw.json()["data"]] == ["state", "state"]
    reasons = " ".join(e.reason or "" for e in client.rollout_history("steer"))
    assert "first try" in reasons and "looks fine" in reasons and "retry of rollout" in reasons
    error(httpx.get(f"{url}/admin/rollouts/never", headers=ADMIN), 404, "rollout_not_found")
    error(httpx.post(f"{url}/admin/rollouts/steer/explode", headers=ADMIN), 404, None, "unknown rollout action")


def test_async_client_rollout_methods(url: str, alpha: dict[str, Any]) -> None:
    from peftserve.client import AsyncClient

    async def go() -> None:
        async with AsyncClient(url, admin_token=TOKEN) as client:
            status = await client.rollout("alpha")
            assert (status.state, status.weight, status.candidate) == ("ramping", 25.0, "v2")
            assert "alpha" in [r.task for r in await client.rollouts()]
            events = await client.rollout_history("alpha", kinds=["state"])
            assert events[0].state_to == "ramping" and events[0].weight == 25.0
            answer = await client.completion("alpha", "abc", max_tokens=2, user="someone")
            assert (await client.feedback(answer.id, False)).score == 0.0
            with pytest.raises(PeftserveError):
                await client.retry_rollout("alpha")

    asyncio.run(go())


def test_metrics_export_rollout_state(url: str, alpha: dict[str, Any]) -> None:
    inside, outside = users("alpha", 25, True)[0], users("alpha", 25, False)[0]
    assert served(complete(url, "alpha", user=inside)) == ("alpha@v2", "candidate")
    assert served(complete(url, "alpha", user=outside)) == ("alpha@v1", "stable")
    assert served(complete(url, "alpha@v2"))[0] == "alpha@v2"  # pinned: its own arm in the metrics
    assert wait_for(lambda: "peftserve_rollout_judgments_total{" in httpx.get(f"{url}/metrics").text)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)}

    def value(name: str, sample: str | None = None, **labels: str) -> float | None:
        hits = [s.value for s in families[name].samples
                if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items())]  # fmt: skip
        return sum(hits) if hits else None

    assert value("peftserve_canary_weight_ratio", task="alpha") == 0.25
    assert value("peftserve_rollout_state", task="alpha", state="ramping") == 1.0
    assert value("peftserve_rollout_state", task="alpha", state="paused") == 0.0
    total = "peftserve_requests_total"
    for arm, version in (("candidate", "v2"), ("stable", "v1"), ("pinned", "v2")):
        assert value("peftserve_requests", total, task="alpha", version=version, arm=arm, outcome="ok") >= 1, arm
    samples = "peftserve_canary_window_samples"
    assert value(samples, task="alpha", version="v2", arm="candidate", kind="requests") >= 1
    assert value(samples, task="alpha", version="v1", arm="stable", kind="requests") >= 1


def test_a_request_with_several_choices_is_one_sample(url: str, alpha: dict[str, Any]) -> None:
    inside = users("alpha", 25, True)[0]

    def counts() -> tuple[float, float, float]:
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)}
        window = [s.value for s in families["peftserve_canary_window_samples"].samples
                  if s.labels == {"task": "alpha", "version": "v2", "arm": "candidate", "kind": "requests"}]
        requests = [s for s in families["peftserve_requests"].samples if s.name == "peftserve_requests_total"
                    and s.labels["version"] == "v2" and s.labels["arm"] == "candidate"]
        tokens = [s.value for s in families["peftserve_generation_tokens"].samples
                  if s.name == "peftserve_generation_tokens_total" and s.labels["version"] == "v2"
                  and s.labels["arm"] == "candidate"]  # fmt: skip
        return sum(window), sum(s.value for s in requests), sum(tokens)

    before = counts()
    response = complete(url, "alpha", inside, max_tokens=3, n=3, temperature=1.0, seed=1, ignore_eos=True)
    assert served(response) == ("alpha@v2", "candidate") and len(response.json()["choices"]) == 3
    after = counts()
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1  # one request, one sample
    assert after[2] == before[2] + 9  # its tokens: every choice's


# ---- a failing candidate --------------------------------------------------------------------------


def test_non_finite_candidate_is_rolled_back_and_stable_answers_for_it(url: str, client: Client) -> None:
    expected = text(complete(url, "nan@v1"))
    error(complete(url, "nan@bad"), 500, "internal_error")  # pinned: no fallback, the engine's error
    assert start(url, "nan", "bad", steps=[50]).status_code == 201
    touched = 0
    for i in range(60):
        user = f"n{i}"
        stream = i % 3 == 0
        if stream:
            body = {"model": "nan", "prompt": "abc", "max_tokens": 4, "temperature": 0, "user": user, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                version, arm = response.headers["x-peftserve-version"], response.headers["x-peftserve-arm"]
                events = [json.loads(line[6:]) for line in response.iter_lines()
                          if line.startswith("data: {")]
            got = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
        else:
            response = complete(url, "nan", user)
            (version, arm), got = served(response), text(response)
        assert (version, arm, got) == ("nan@v1", "stable", expected), (user, stream)
        touched += in_cohort("nan", user, 50)
        if client.rollout("nan").state == "rolled_back":
            break
    assert touched >= 10
    assert wait_for(lambda: client.rollout("nan").state == "rolled_back", timeout=10)
    status = client.rollout("nan")
    assert status.weight == 0.0 and status.last_judgment.result == "fail"
    assert status.last_judgment.deciding_metric in ("non_finite", "error_rate")
    candidate = status.arms["candidate"]
    assert candidate["non_finite"] >= 10 and candidate["non_finite"] == candidate["requests"]
    rollback = client.rollout_history("nan", kinds=["state"])[-1]
    assert rollback.state_to == "rolled_back" and "critical metric" in rollback.reason
    unloaded = lambda: any("unloaded bad" in (e.reason or "") for e in client.rollout_history("nan", kinds=["unload"]))  # noqa: E731
    assert wait_for(unloaded, timeout=10)
    assert client.show("nan", "bad").status != "gpu"


def test_non_finite_candidate_with_streaming_traffic_only_is_rolled_back(url: str, client: Client) -> None:
    """A candidate failing before its first token, in streams: counted once, then rolled back."""
    assert start(url, "nanstream", "bad", steps=[50]).status_code == 201
    touched = 0
    for i in range(60):
        user = f"ns{i}"
        body = {"model": "nanstream", "prompt": "abc", "max_tokens": 4, "temperature": 0, "user": user, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            assert response.headers["x-peftserve-version"] == "nanstream@v1"
            assert any(line == "data: [DONE]" for line in response.iter_lines())
        touched += in_cohort("nanstream", user, 50)
        if client.rollout("nanstream").state == "rolled_back":
            break
    assert touched >= 10
    assert wait_for(lambda: client.rollout("nanstream").state == "rolled_back", timeout=10)
    status = client.rollout("nanstream")
    assert status.last_judgment.result == "fail"
    candidate = status.arms["candidate"]
    assert candidate["non_finite"] >= 10 and candidate["non_finite"] == candidate["requests"]


# ---- shadow copies -------------------------------------------------------------------------------


def _shadow_run(url: str, client: Client, candidate: str, n: int = 16) -> dict[str, Any]:
    assert start(url, "shadow", candidate, steps=[50], shadow_percent=100).status_code == 201
    try:
        assert client.rollout("shadow").state == "shadow"
        for i in range(n):
            prompt = f"p{i % 8} abc"
            expected = text(complete(url, "shadow@v1", prompt=prompt, max_tokens=6))
            response = complete(url, "shadow", f"s{i}", prompt=prompt, max_tokens=6)
            assert served(response) == ("shadow@v1", "stable") and text(response) == expected
        assert wait_for(lambda: client.rollout("shadow").shadow["n"] >= n // 2, timeout=30)
        return client.rollout("shadow").shadow
    finally:
        try:
            client.rollback_rollout("shadow")
        except PeftserveError as e:  # the controller may have ended it already (slow machines)
            assert e.status == 404, e


def test_shadow_copies_never_reach_the_client_and_measure_divergence(url: str, client: Client) -> None:
    same = _shadow_run(url, client, "same")
    assert same["errors"] == 0 and same["agreement_rate"] == 1.0
    diff = _shadow_run(url, client, "diff")
    assert diff["errors"] == 0 and diff["agreement_rate"] < 1.0
    # Prometheus counts the copies apart from user traffic, on the candidate's series.
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    shadowed = [f for f in text_string_to_metric_families(metrics) if f.name == "peftserve_requests"][0]
    copies = sum(s.value for s in shadowed.samples if s.labels["arm"] == "shadow" and s.labels["version"] == "diff"
                 and s.labels["outcome"] == "ok")  # fmt: skip
    assert copies >= diff["n"], (copies, diff)
    if not HAS_SCORE:
        pytest.skip("engine.score is missing: shadow LLR not measured (agreement checked)")
    assert same["noise_floor_n"] >= 1 and abs(same["noise_floor_mean_llr"]) < 1e-3
    assert abs(same["mean_llr"]) < 1e-3 and abs(same["divergence"]) < 1e-3
    assert diff["divergence"] > 0.05, diff


def test_a_refused_shadow_copy_is_skipped_not_a_candidate_error() -> None:
    """generate raising (queue full, adapter gone) never ran the candidate: counted as skipped."""
    recorded: list[dict[str, Any]] = []
    runtime = CanaryRuntime.__new__(CanaryRuntime)
    runtime.shadow_counts = {}
    runtime.engine = SimpleNamespace()  # no score: no LLR
    runtime.windows = SimpleNamespace(record_shadow=lambda *a, **kw: recorded.append(kw), record=lambda r: None)
    runtime.table = SimpleNamespace(router=SimpleNamespace(rollout=lambda task: None))  # routes through its table
    decision = RouteDecision("t", "v1", "stable", "hash", True, 0, shadow_version="v2")
    target = Target("t", "v1", "t@v1", decision)

    async def refused(*args: Any) -> InternalResult:
        raise QueueFull("full")

    async def failed(*args: Any) -> InternalResult:
        return InternalResult(token_ids=[], finish_reason="error", error="boom")

    runtime.generate = refused  # type: ignore[method-assign]
    asyncio.run(runtime._run_shadow(target, [1, 2], SamplingParams(max_tokens=2), [3], "x"))
    assert recorded == [] and runtime.shadow_counts["t"] == {"ok": 0, "error": 0, "skipped": 1}
    runtime.generate = failed  # type: ignore[method-assign]
    asyncio.run(runtime._run_shadow(target, [1, 2], SamplingParams(max_tokens=2), [3], "x"))
    assert len(recorded) == 1 and recorded[0]["error"] is True
    assert runtime.shadow_counts["t"] == {"ok": 0, "error": 1, "skipped": 1}


# ---- restart -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()}")
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(240)
def test_sigkill_during_a_rollout_resumes_at_its_weight_with_history(
    model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    data_dir, port = tmp_path / "data", _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "peftserve.cli", "serve", "--model", str(model_dir), "--device", "cpu",
            "--port", str(port), "--data-dir", str(data_dir), "--served-model-name", "base",
            "--log-level", "warning", "--canary-interval-s", "0.2"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: _healthy(url, proc), timeout=120), "server did not come up"
        with Client(url) as client:
            client.upload(adapters["one"], "crash", "v1")
            client.upload(adapters["two"], "crash", "v2")
            client.start_rollout("crash", "v2", steps=[25, 50], interval=3600, analysis=QUICK_ANALYSIS)
            for i in range(12):
                complete(url, "crash", f"c{i}", max_tokens=1)
            assert wait_for(lambda: client.rollout("crash").last_judgment is not None, timeout=10)
            before = [(e.kind, e.reason) for e in client.rollout_history("crash", limit=1000)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    with running_server(model_dir, data_dir=str(data_dir), served_model_name="base", **FAST) as restarted, \
            Client(restarted) as client:
        status = client.rollout("crash")
        assert (status.state, status.weight, status.step_index) == ("ramping", 25.0, 0)
        history = [(e.kind, e.reason) for e in client.rollout_history("crash", limit=1000)]
        assert history[: len(before)] == before
        assert any(kind == "restored" and "ramping at 25 %" in reason for kind, reason in history)
        for i in range(40):
            user = f"r{i}"
            arm = served(complete(restarted, "crash", user, max_tokens=1))[1]
            assert arm == ("candidate" if in_cohort("crash", user, 25) else "stable")
