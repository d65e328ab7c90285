"""The README's examples, run as written, so the README cannot drift from the code.

A fenced block right after the comment ``<!-- readme-test: run -->`` is an example: the test
runs every one, in document order, from the repository root, against a server started as the
README's command 1 starts it (``python -m peftserve.cli serve``), only on a free port and a
temporary data directory. ``bash`` blocks run under ``bash -e -o pipefail`` with the
environment's ``bin/`` first on PATH (what ``source .venv/bin/activate`` gives) and
``PEFTSERVE_SERVER`` naming the server; ``python`` blocks run with this interpreter. The one
placeholder: ``127.0.0.1:8000`` in a block becomes the server's address. Options in the comment:
``prints="TEXT"`` (repeatable, a JSON string) requires TEXT in the block's standard output.
The convention is also written at the top of README.md, where new examples are added.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PLACEHOLDER = "127.0.0.1:8000"
MARKER = re.compile(r"<!-- readme-test: run((?: [a-z]+=\"(?:[^\"\\]|\\.)*\")*) -->")
OPTION = re.compile(r" ([a-z]+)=(\"(?:[^\"\\]|\\.)*\")")
LANGUAGES = {"bash": "bash", "sh": "bash", "python": "python"}
BLOCK_TIMEOUT_S = 300
STARTUP_TIMEOUT_S = 240


@dataclass(frozen=True)
class Example:
    line: int
    """Line of the opening fence in README.md."""
    language: str
    code: str
    prints: tuple[str, ...] = field(default_factory=tuple)

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.language}"


def read_examples(text: str) -> list[Example]:
    """The marked blocks of a README; ValueError for a malformed marker or a marker without a block."""
    lines = text.splitlines()
    examples = []
    for i, line in enumerate(lines):
        if not line.startswith("<!-- readme-test"):
            continue
        where = f"README.md line {i + 1}"
        match = MARKER.fullmatch(line.strip())
        if match is None:
            raise ValueError(
                f'{where}: expected <!-- readme-test: run [prints="TEXT" ...] -->, not {line!r}'
            )
        prints = []
        for key, value in OPTION.findall(match.group(1)):
            if key != "prints":
                raise ValueError(f"{where}: unknown option {key!r} (known: prints)")
            prints.append(json.loads(value))
        fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
        language = LANGUAGES.get(fence.removeprefix("```"))
        if not fence.startswith("```") or language is None:
            raise ValueError(
                f"{where}: the marker must stand right above a ```bash or ```python block"
            )
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{where}: the block is never closed")
        examples.append(
            Example(i + 2, language, "\n".join(lines[i + 2 : end]) + "\n", tuple(prints))
        )
    return examples


EXAMPLES = read_examples(README.read_text())


def test_the_readme_marks_its_examples() -> None:
    """The examples the README must keep runnable are marked (so dropping a marker fails here)."""
    code = "\n".join(e.code for e in EXAMPLES)
    for needed in ("curl -s http://127.0.0.1:8000/v1/completions", "from openai import OpenAI",
                   "peftserve adapters upload", "curl -s -X PUT", "peftserve rollout start",
                   "from peftserve import Client"):  # fmt: skip
        assert needed in code, f"no runnable README example contains {needed!r}"
    with pytest.raises(ValueError, match="unknown option 'print'"):
        read_examples('<!-- readme-test: run print="x" -->\n```bash\necho\n```\n')
    with pytest.raises(ValueError, match="right above"):
        read_examples("<!-- readme-test: run -->\n\n```bash\necho\n```\n")


def test_the_readme_links_only_inside_the_repository() -> None:
    links = re.findall(r"\]\(([^)]+)\)", README.read_text())
    assert links
    for link in links:
        target = (ROOT / link.split("#")[0]).resolve()
        assert "://" not in link and target.is_relative_to(ROOT) and target.exists(), link


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``peftserve serve`` as command 1 runs it, from the repository root, on a fresh data directory."""
    data_dir = tmp_path_factory.mktemp("data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFTSERVE_")}
    log = (tmp_path_factory.mktemp("log") / "server.log").open("w+")
    argv = [
        sys.executable,
        "-m",
        "peftserve.cli",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
    ]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(url):
            log.seek(0)
            assert proc.poll() is None, f"the server exited:\n{log.read()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"the server did not answer /health:\n{log.read()[-3000:]}"
            )
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_readme_example(example: Example, server: str) -> None:
    """One README example, run as written (the examples run in order: each continues the last)."""
    code = example.code.replace(PLACEHOLDER, server.removeprefix("http://"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFTSERVE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PEFTSERVE_SERVER"] = server
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    argv = (
        ["bash", "-e", "-o", "pipefail", "-c", code]
        if example.language == "bash"
        else [sys.executable, "-c", code]
    )
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )
    shown = f"{example.id} exited {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, shown
    for text in example.prints:
        assert text in done.stdout, f"{example.id} did not print {text!r}\n{shown}"
