"""`peftserve rollout ...` against a running server: start with an eval set and targeting, status
and history tables, --json, pause/resume/promote/rollback/retry, probe accuracy judged from the
eval set, and failures that exit non-zero with the server's message."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from peftserve.cli import main
from peftserve.client import AsyncClient, Client, PeftserveError
from tests.server_utils import running_server, wait_for
from tests.tiny_models import make_peft_adapter, make_tiny_model

PROBE_TOKENS = 6
PROMPTS = [f"{c}{d} abc" for c in "abcdef" for d in "xyzw"]
"""24 prompts: a greedy set answered once per version can show a drop only with enough prompts."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), "llama")


@pytest.fixture(scope="module")
def url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("adapters")
    one = make_peft_adapter(model_dir, root / "one", seed=1, std=0.3)
    two = make_peft_adapter(model_dir, root / "two", seed=2, std=0.3)
    with running_server(model_dir, served_model_name="base", canary_interval_s=0.2,
                        probe_max_tokens=PROBE_TOKENS, probes_per_tick=5) as base_url:  # fmt: skip
        with Client(base_url) as client:
            for task, candidate in (("cli", one), ("probe", two), ("shade", two)):
                client.upload(one, task, "v1")
                client.upload(candidate, task, "v2")
        yield base_url


@pytest.fixture(scope="module")
def eval_set(url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Known answers: what v1 answers greedily (so v1 scores 100 % and a different v2 does not)."""
    lines = []
    with Client(url) as client:
        for prompt in PROMPTS:
            answer = client.completion("cli@v1", prompt, max_tokens=PROBE_TOKENS, temperature=0).text
            lines.append(json.dumps({"prompt": prompt, "answer": answer}))
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(url: str, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["rollout", *argv, "--server", url])
    out, err = capsys.readouterr()
    return code, out, err


def test_start_with_eval_set_and_targeting_then_status_and_history(
    url: str, eval_set: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(url, capsys, "start", "cli", "--candidate", "v2", "--steps", "10,20", "--interval",
                         "3600", "--min-samples", "10", "--eval-set", str(eval_set), "--target-header",
                         "x-tier=internal,beta", "--reason", "from the cli", "--json")  # fmt: skip
    assert code == 0, err
    started = json.loads(out)
    assert (started["state"], started["weight"], started["stable"], started["candidate"]) == ("ramping", 10.0, "v1", "v2")
    assert started["spec"]["targeting"] == [{"header": "x-tier", "values": ["internal", "beta"], "op": "in"}]
    assert started["spec"]["analysis"]["min_samples"] == 10
    assert "probe_accuracy" in [m["name"] for m in started["spec"]["analysis"]["metrics"]]

    with Client(url) as client:
        assert wait_for(lambda: client.rollout("cli").arms["stable"]["probes"] >= 10, timeout=30)
        stable = client.rollout("cli").arms["stable"]
    assert stable["probe_accuracy"] == 1.0 and stable["requests"] == 0  # probes are no user traffic
    code, out, err = cli(url, capsys, "status", "cli")
    assert code == 0, err
    assert out.startswith("cli: v1 -> v2 ramping at 10 % (step 1 of 2)")
    for label in ("steps", "judgment", "decision", "stable", "candidate"):
        assert f"\n  {label}" in out, out
    assert "probe accuracy 100%" in out

    code, out, err = cli(url, capsys, "history", "cli")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "EVENT", "WEIGHT", "RESULT", "PROGRESS", "REASON"]
    assert "state start -> ramping" in lines[1] and "10 %" in lines[1] and "from the cli" in lines[1]
    assert any("decision hold" in line for line in lines)
    code, out, _ = cli(url, capsys, "history", "cli", "--kind", "state", "--json")
    assert code == 0 and [e["state_to"] for e in json.loads(out)] == ["ramping"]


def test_pause_resume_promote_rollback_retry(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(url, capsys, "pause", "cli", "--reason", "a closer look")
    assert code == 0, err
    assert out.splitlines()[0] == "paused the rollout of cli" and "paused at 10 %" in out
    code, out, err = cli(url, capsys, "pause", "cli")
    assert code == 1 and out == ""
    assert "peftserve rollout pause: error:" in err and "already paused" in err and "(HTTP 409)" in err
    assert cli(url, capsys, "resume", "cli")[0] == 0
    code, out, err = cli(url, capsys, "promote", "cli", "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "promoted"
    with Client(url) as client:
        assert client.task("cli").stable == "v2"
    code, _, err = cli(url, capsys, "rollback", "cli")
    assert code == 1 and "no active rollout" in err and "(HTTP 404)" in err
    code, _, err = cli(url, capsys, "retry", "cli")
    assert code == 1 and "only a rolled-back rollout can be retried" in err

    assert cli(url, capsys, "start", "cli", "--candidate", "v1", "--interval", "3600")[0] == 0
    code, out, _ = cli(url, capsys, "rollback", "cli")
    assert code == 0 and "rolled back the rollout of cli" in out and "rolled_back at 0 %" in out
    code, out, _ = cli(url, capsys, "retry", "cli", "--json")
    assert code == 0 and json.loads(out)["state"] == "ramping"
    assert cli(url, capsys, "rollback", "cli")[0] == 0


def test_probe_accuracy_regression_rolls_back(
    url: str, eval_set: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(url, capsys, "start", "probe", "--candidate", "v2", "--steps", "5", "--interval", "3600",
                       "--min-samples", "10", "--eval-set", str(eval_set))  # fmt: skip
    assert code == 0, err
    with Client(url) as client:
        assert wait_for(lambda: client.rollout("probe").state == "rolled_back", timeout=30)
        status = client.rollout("probe")
    assert status.last_judgment.deciding_metric == "probe_accuracy"
    assert status.arms["stable"]["probe_accuracy"] == 1.0 and status.arms["candidate"]["probe_accuracy"] < 0.5


def test_shadow_percent_starts_a_shadow_phase(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(url, capsys, "start", "shade", "--candidate", "v2", "--shadow-percent", "100",
                         "--interval", "3600", "--min-samples", "10")  # fmt: skip
    assert code == 0, err
    assert "shadow at 0 % (shadow phase)" in out
    for i in range(4):
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "shade", "prompt": "abc", "max_tokens": 3, "user": f"u{i}"})
        assert response.headers["x-peftserve-arm"] == "stable"
    with Client(url) as client:
        assert wait_for(lambda: client.rollout("shade").shadow["n"] >= 1, timeout=30)
    code, out, _ = cli(url, capsys, "status", "shade")
    assert code == 0 and "\n  shadow     " in out and "copies" in out
    code, out, _ = cli(url, capsys, "status", "--json")
    assert code == 0 and {"cli", "probe", "shade"} <= {r["task"] for r in json.loads(out)}
    assert cli(url, capsys, "rollback", "shade")[0] == 0


def test_per_metric_tolerances_and_watch(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(url, capsys, "start", "shade", "--candidate", "v2", "--interval", "3600",
                         "--tolerance", "error_rate=0.01", "--mde", "non_finite=0.2", "--mde", "error_rate=0.05",
                         "--probe-temperature", "0.7", "--json")  # fmt: skip
    assert code == 0, err
    spec = json.loads(out)["spec"]
    metrics = {m["name"]: m for m in spec["analysis"]["metrics"]}
    assert metrics["error_rate"]["tolerance"] == 0.01 and metrics["error_rate"]["mde"] == 0.05
    assert metrics["non_finite"]["mde"] == 0.2 and spec["probe_temperature"] == 0.7
    code, out, _ = cli(url, capsys, "status", "shade")
    assert code == 0 and "next: advance" in out.splitlines()[0]
    assert cli(url, capsys, "rollback", "shade")[0] == 0
    code, out, _ = cli(url, capsys, "status", "shade", "--watch", "--every", "0.1")  # ended: one frame
    assert code == 0 and "shade: v1 -> v2 rolled_back" in out
    code, _, err = cli(url, capsys, "start", "shade", "--candidate", "v2", "--tolerance", "bleu=0.1")
    assert code == 1 and "no metric bleu" in err
    with pytest.raises(SystemExit):
        main(["rollout", "start", "shade", "--candidate", "v2", "--mde", "latency"])
    assert "expected METRIC=NUMBER" in capsys.readouterr().err


def test_the_clients_carry_tolerances_mdes_and_the_probe_temperature(url: str) -> None:
    """Client and AsyncClient (one request builder) send per-metric margins in either spelling
    (a mapping, ``METRIC=X`` strings) and the probe temperature; the server's spec holds them."""

    def judged(rollout) -> dict[str, tuple[float, float]]:
        return {m["name"]: (m["tolerance"], m["mde"]) for m in rollout.spec["analysis"]["metrics"]}

    with Client(url) as client:
        rollout = client.start_rollout("shade", "v2", interval=3600, tolerance={"error_rate": 0.02},
                                       mde=["non_finite=0.3", "error_rate=0.1"], probe_temperature=0.5)  # fmt: skip
        client.rollback_rollout("shade")
    assert judged(rollout)["error_rate"] == (0.02, 0.1) and judged(rollout)["non_finite"][1] == 0.3
    assert rollout.spec["probe_temperature"] == 0.5

    async def start_async():
        async with AsyncClient(url) as client:
            started = await client.start_rollout("shade", "v2", interval=3600, tolerance="non_finite=0.001",
                                                 mde={"non_finite": 0.05})  # fmt: skip
            await client.rollback_rollout("shade")
            return started

    rollout = asyncio.run(start_async())
    assert judged(rollout)["non_finite"] == (0.001, 0.05) and rollout.spec["probe_temperature"] == 0.0
    with Client(url) as client, pytest.raises(PeftserveError, match="no metric bleu") as refused:
        client.start_rollout("shade", "v2", mde={"bleu": 0.1})
    assert refused.value.status == 400


def test_failures_exit_non_zero_with_the_servers_message(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(url, capsys, "start", "cli", "--candidate", "v9")
    assert code == 1 and out == ""
    assert err.startswith("peftserve rollout start: error: unknown candidate version 'v9'") and "(HTTP 400)" in err
    code, _, err = cli(url, capsys, "start", "cli", "--candidate", "v1", "--steps", "50,10")
    assert code == 1 and "strictly increasing" in err
    code, _, err = cli(url, capsys, "status", "nothing")
    assert code == 1 and "never had a rollout" in err and "(HTTP 404)" in err
    code, _, err = cli(url, capsys, "start", "cli", "--candidate", "v1", "--eval-set", str(tmp_path / "none.jsonl"))
    assert code == 1 and f"eval set file {tmp_path / 'none.jsonl'} does not exist" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "", "answer": "b"}\n')
    code, _, err = cli(url, capsys, "start", "cli", "--candidate", "v1", "--eval-set", str(bad))
    assert code == 1 and 'eval_set line 3 must be an object with a non-empty string "prompt"' in err
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": \n')
    code, _, err = cli(url, capsys, "start", "cli", "--candidate", "v1", "--eval-set", str(bad))
    assert code == 1 and "eval_set line 2 is not valid JSON" in err
    with Client(url) as client, pytest.raises(PeftserveError, match="eval_set line 2 must be an object"):
        client.start_rollout("cli", "v1", eval_set=[{"prompt": "a", "answer": "b"}, {"prompt": "a"}])
    code, _, err = cli("http://127.0.0.1:9", capsys, "status", "cli")
    assert code == 1 and "cannot reach the peftserve server" in err
    with pytest.raises(SystemExit):
        main(["rollout", "start", "cli", "--candidate", "v1", "--target-header", "no-equals-sign"])
    assert "a target header must look like HEADER=VALUE[,VALUE...], not 'no-equals-sign'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["rollout", "start", "cli", "--candidate", "v1", "--steps", "10,x"])
    assert "step 2 is 'x'" in capsys.readouterr().err


def test_the_real_command_line(url: str) -> None:
    env = {**os.environ, "PEFTSERVE_SERVER": url}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "peftserve.cli", "rollout", *argv],
                              capture_output=True, text=True, timeout=120, env=env)  # fmt: skip

    listed = run("status")
    assert listed.returncode == 0, listed.stderr
    missing = run("history", "nothing")
    assert missing.returncode == 1 and "never had a rollout" in missing.stderr and missing.stdout == ""


def test_output_cut_short_is_no_failure(url: str) -> None:
    """``peftserve rollout start ... | head -1``: the reader leaves early, the rollout still starts,
    and the command exits 0 without a word on stderr (here the pipe has no reader at all)."""
    argv = [sys.executable, "-m", "peftserve.cli", "rollout", "start", "shade", "--candidate", "v2",
            "--interval", "3600", "--server", url.removeprefix("http://")]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""
    with Client(url) as client:
        assert client.rollout("shade").state == "ramping"
        client.rollback_rollout("shade")
