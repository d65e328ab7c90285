"""From the repository root, nothing in it is importable under another package's name.

The top-level ``kernels/`` folder is the package ``peftserve.kernels``. With the root on
``sys.path`` (``python -m``, ``python -c``, the demo's server subprocess) Python also finds it
as ``kernels``, the name of Hugging Face's package, which transformers probes for: in a
requirements.txt-only environment (no triton) ``import peft`` used to fail there. These tests
run from the root in such an environment (``runtime_python``, see ``tests/runtime_env.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.runtime_env import installed

ROOT = Path(__file__).resolve().parent.parent
OURS = {"peftserve", "tests", "kernels"}
"""Regular packages in the root: ours, and kernels/ hands its top-level name over."""


def from_root(
    python: Path | str, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run([str(python), *argv], cwd=ROOT, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_environment_is_what_requirements_txt_installs(runtime_python: Path) -> None:
    code = ("import importlib.util as u, peftserve; print(peftserve.__file__); "
            "print([m for m in ('triton', 'openai', 'pytest', 'scipy') if u.find_spec(m)])")  # fmt: skip
    done = from_root(runtime_python, "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [str(ROOT / "peftserve" / "__init__.py"), "[]"]


def test_peft_and_transformers_import_from_the_root(runtime_python: Path) -> None:
    code = ("import peft, transformers, kernels; from transformers import LlamaForCausalLM; "
            "from transformers.utils import is_kernels_available; "
            "assert not is_kernels_available() and getattr(kernels, '__file__', None) is None; "
            "assert not hasattr(kernels, 'lora_shrink'); print('ok')")  # fmt: skip
    done = from_root(runtime_python, "-c", code)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr[-3000:]
    done = from_root(runtime_python, "-m", "peftserve.cli", "demo", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: peftserve demo"), done.stderr[
        -3000:
    ]


def test_an_installed_kernels_package_keeps_its_name(tmp_path: Path) -> None:
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text(
        '__version__ = "0.9.0"\nTHE_REAL_ONE = True\n'
    )
    code = ("import kernels; assert kernels.THE_REAL_ONE, kernels; "
            "from peftserve import kernels as ours; assert ours.lora_shrink and ours is not kernels; print('ok')")  # fmt: skip
    done = from_root(sys.executable, "-c", code, env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr[-3000:]


def test_no_other_package_lives_in_the_root() -> None:
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert packages | modules <= OURS, (
        "a package in the repository root shadows any installed one of its name"
    )
    names = {
        p.name.removesuffix(".py")
        for p in ROOT.iterdir()
        if p.name.removesuffix(".py").isidentifier()
    }
    for name, dist in installed().items():
        tops = {f.parts[0].removesuffix(".py") for f in dist.files or [] if f.parts}
        assert name == "peftserve" or not tops & names, (
            f"{name} installs {tops & names}, also in the root"
        )
