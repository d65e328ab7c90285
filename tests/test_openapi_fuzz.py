"""schemathesis against /openapi.json of a real server on loopback: no 500, every answer as documented.

Every operation of the document (OpenAI routes, feedback, admin, health) gets generated
requests, valid and invalid (schemathesis' coverage and fuzzing phases); each response must
not be a server error and must conform to the document: a documented status, content type,
headers and body schema. The run is bounded (``MAX_EXAMPLES`` per operation, fixed seed, no
shrinking) so it stays well under a minute on two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_utils import running_server
from tests.tiny_models import make_peft_adapter, make_tiny_model

REPO = Path(__file__).resolve().parent.parent
MAX_EXAMPLES = 20
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)


@pytest.fixture(scope="module")
def fuzz_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = make_tiny_model(tmp_path_factory.mktemp("model"), "llama")
    adapter = make_peft_adapter(model, tmp_path_factory.mktemp("adapters") / "alpha")
    flags = {"served_model_name": "base", "max_model_len": 32, "max_num_seqs": 4}
    with running_server(model, {"alpha": adapter}, **flags) as url:
        yield url


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    fuzz_url: str, tmp_path: Path
) -> None:
    argv = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{fuzz_url}/openapi.json",
        "--checks", ",".join(CHECKS),
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "1",
        "--no-shrink",
        "--workers", "1",
        "--request-timeout", "60",
        "--suppress-health-check", "all",
        "--report-dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "NO_COLOR": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    # From a temporary directory: schemathesis and hypothesis keep their caches in the cwd.
    run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-20000:]
    assert "passed" in report and "failed" not in report.split("SUMMARY")[-1], report[-5000:]
