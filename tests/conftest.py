"""Test-session setup, loaded before any test module is collected."""

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads
# TRITON_INTERPRET when triton.language is first imported (its own helpers such as tl.cdiv
# are @triton.jit functions), and peft imports triton, so it must be set here, before any
# test module imports peft, transformers or triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh random seed for this test (``PEFTSERVE_TEST_SEED=N`` repeats one); a failure names it."""
    value = int(os.environ.get("PEFTSERVE_TEST_SEED") or random.randrange(2**31))
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = (yield).get_result()
    seeds = [value for key, value in item.user_properties if key == "seed"]
    if report.failed and seeds:
        report.sections.append(("seed", f"random seed {seeds[0]}: rerun with PEFTSERVE_TEST_SEED={seeds[0]}"))


@pytest.fixture(scope="session")
def runtime_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of an environment holding only what requirements.txt installs (tests/runtime_env.py)."""
    from tests.runtime_env import runtime_environment

    return runtime_environment(tmp_path_factory.mktemp("runtime") / "env")
