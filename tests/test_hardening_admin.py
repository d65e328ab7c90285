"""Hardening of the admin API over real HTTP (issue 8, items 7-10): every class of bad upload is
a 400/409/503/507 in OpenAI's shape that names its cause, never a 500, and the store (registry
rows, blobs, stable pointers, tmp/) is unchanged wherever the request did not succeed.

- item 7: mistyped adapter_config.json fields (several inputs per field) name the field;
- item 8: adapters whose scaled weights or LoRA delta overflow the serving dtype are refused;
- item 9: concurrent PUTs of one task@version: exactly one 201, 200 for the same content,
  409 for other content, whatever the interleaving;
- item 10: a data directory that cannot be written (permissions) or is full (a file size
  limit) gives 503/507 naming the cause, and DELETE happens entirely or not at all.

For item 10 the server runs in a subprocess so that only it gets the storage limits: a file
size limit (``RLIMIT_FSIZE``: writes past it fail with EFBIG, as a full disk fails with
ENOSPC; Python ignores SIGXFSZ) and, when the tests run as root (where ``chmod`` does not stop
writes), a capability bounding set without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and
CAP_FOWNER, so that the kernel applies the directory's permission bits to it as to any user.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save

from tests.server_utils import (
    adapter_parts,
    registry_snapshot,
    running_server,
    upload_parts,
    wait_for,
)
from tests.tiny_models import make_peft_adapter, make_tiny_model

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), "llama")


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_peft_adapter(model_dir, root / "alpha", r=4, seed=1, std=0.3),
        "one": make_peft_adapter(model_dir, root / "one", r=4, seed=2, std=0.3),
        "two": make_peft_adapter(model_dir, root / "two", r=8, seed=3, std=0.3,
                                 target_modules=["q_proj", "o_proj"]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def url(model_dir: Path, adapters: dict[str, Path], data_dir: Path) -> Iterator[str]:
    with running_server(
        model_dir, {"alpha": adapters["alpha"]}, served_model_name="base", data_dir=str(data_dir)
    ) as base_url:
        yield base_url


@pytest.fixture
def unchanged(data_dir: Path) -> Iterator[None]:
    """The store after the test is exactly the store before it, with no temporary files."""
    before = registry_snapshot(data_dir)
    yield
    after = registry_snapshot(data_dir)
    assert after == before and after["tmp"] == []


def _error(response: httpx.Response, status: int, code: str, *needles: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["code"] == code, error
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error"), error
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error


def _parts(adapter: Path, config_text: str | bytes | None = None, weights: bytes | None = None):
    """Upload parts of ``adapter``, with its config text and/or weights bytes replaced."""
    config = (adapter / CONFIG).read_bytes() if config_text is None else config_text
    config = config.encode() if isinstance(config, str) else config
    weights = (adapter / WEIGHTS).read_bytes() if weights is None else weights
    return [(CONFIG, CONFIG, config), (WEIGHTS, WEIGHTS, weights)]


def _config_with(adapter: Path, **changes: object) -> str:
    """The adapter's config JSON with ``changes`` (``json.dumps`` writes NaN and Infinity as
    Python's json module reads them; a value of ``...`` removes the key)."""
    config = json.loads((adapter / CONFIG).read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    return json.dumps(config)


def _scaled_weights(adapter: Path, factor_a: float, factor_b: float) -> bytes:
    tensors = load_file(adapter / WEIGHTS)
    scaled = {
        k: (t.double() * (factor_a if "lora_A" in k else factor_b)).to(t.dtype).contiguous()
        for k, t in tensors.items()
    }
    return save(scaled)


def _complete(url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "abc", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


# ---- item 7: mistyped adapter_config.json fields ------------------------------------------------

NAN, INF = float("nan"), float("inf")
MISTYPED = [
    ("lora_alpha", "x"), ("lora_alpha", [1]), ("lora_alpha", NAN), ("lora_alpha", INF),
    ("lora_alpha", -INF), ("lora_alpha", True), ("lora_alpha", None), ("lora_alpha", {"a": 1}),
    ("lora_alpha", 10**400),
    ("r", "4"), ("r", 4.0), ("r", 0), ("r", -4), ("r", True), ("r", None),
    ("rank_pattern", []), ("rank_pattern", "x"), ("rank_pattern", {"q_proj": "4"}),
    ("rank_pattern", {"q_proj": 0}), ("rank_pattern", {"q_proj": 4.5}), ("rank_pattern", {"((": 4}),
    ("alpha_pattern", "x"), ("alpha_pattern", []), ("alpha_pattern", {"q_proj": "x"}),
    ("alpha_pattern", {"q_proj": NAN}), ("alpha_pattern", {"q_proj)": 8}),
    ("target_modules", [1]), ("target_modules", None), ("target_modules", 5),
    ("target_modules", [["q_proj"]]), ("target_modules", {"q_proj": 1}), ("target_modules", "(("),
    ("target_modules", ...),
    ("exclude_modules", 5), ("exclude_modules", [1]), ("exclude_modules", "[z-a]"),
    ("layers_to_transform", "x"), ("layers_to_transform", [-1]), ("layers_to_transform", ["0"]),
    ("layers_to_transform", 1.5), ("layers_to_transform", {"0": 1}),
    ("layers_pattern", 5), ("layers_pattern", [None]),
    ("use_rslora", "yes"), ("use_rslora", 1), ("use_rslora", None),
    ("init_lora_weights", 5), ("init_lora_weights", None), ("bias", 5), ("bias", None),
    ("fan_in_fan_out", "no"), ("lora_dropout", "x"), ("lora_dropout", NAN),
    ("inference_mode", "true"), ("task_type", 5), ("base_model_name_or_path", []),
    ("use_dora", "false"), ("modules_to_save", "lm_head"), ("peft_type", 5), ("peft_type", None),
    ("use_bdlora", {"x": 1}), ("some_future_option", [1, 2]),
]  # fmt: skip


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(("field", "value"), MISTYPED, ids=[f"{f}={v!r:.20}" for f, v in MISTYPED])
def test_mistyped_config_field_is_a_400_naming_it(
    url: str, adapters: dict[str, Path], field: str, value: object
) -> None:
    config = _config_with(adapters["one"], **{field: value})
    response = upload_parts(url, "typed", "v1", _parts(adapters["one"], config))
    error = _error(response, 400, "invalid_adapter", field)
    if field != "peft_type":
        assert CONFIG in error["message"] or "adapter option" in error["message"], error
        assert error["param"] == f"{CONFIG}.{field}", error


MALFORMED = [
    ("[1, 2]", "must hold a JSON object"),
    ('"adapter"', "must hold a JSON object"),
    ("{" * 10 + "}" * 10, "not valid JSON"),
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ('{"r": ' + "9" * 5000 + "}", "not valid JSON"),
    (b'{"r": 4, "x": "\xff\xfe"}', "not valid JSON"),
    ("", "not valid JSON"),
]


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(("config", "needle"), MALFORMED, ids=lambda v: repr(v)[:16])
def test_malformed_config_json_is_a_400(
    url: str, adapters: dict[str, Path], config: str | bytes, needle: str
) -> None:
    response = upload_parts(url, "malformed", "v1", _parts(adapters["one"], config))
    _error(response, 400, "invalid_adapter", CONFIG, needle)


def test_valid_variants_of_typed_fields_are_accepted(url: str, adapters: dict[str, Path]) -> None:
    """The schema is no stricter than PEFT: a float alpha, null patterns, a regex target."""
    one = adapters["one"]
    for version, changes in enumerate([
        {"lora_alpha": 12.5, "rank_pattern": None, "alpha_pattern": None},
        {"target_modules": r".*\.(q_proj|v_proj)", "exclude_modules": None},
        {"alpha_pattern": {"q_proj": 2}, "layers_to_transform": [0, 1]},
    ]):  # fmt: skip
        response = upload_parts(
            url, "variants", f"v{version}", _parts(one, _config_with(one, **changes))
        )
        assert response.status_code == 201, response.text
        assert _complete(url, f"variants@v{version}").status_code == 200


# ---- item 8: weights that overflow the serving dtype ---------------------------------------------

OVERFLOWS = [
    ("alpha 1e308", {"lora_alpha": 1e308}, (1, 1), "lora_B * scaling"),
    ("alpha -1e308", {"lora_alpha": -1e308}, (1, 1), "lora_B * scaling"),
    ("alpha 3e38", {"lora_alpha": 3e38}, (1, 1), "||A||_F * ||B * scaling||_F"),
    ("rslora alpha 1e38", {"lora_alpha": 1e38, "use_rslora": True}, (1, 1), "||A||_F"),
    ("alpha_pattern 1e300", {"alpha_pattern": {"v_proj": 1e300}}, (1, 1), "v_proj"),
    ("weights x 1e30", {}, (1e30, 1e30), "||A||_F * ||B * scaling||_F"),
    ("B x 1e38", {}, (1, 1e38), "overflow"),
    ("A x 1e39 (inf in float32)", {}, (1e39, 1), "NaN or Inf"),
]


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(("label", "changes", "factors", "needle"), OVERFLOWS,
                         ids=[case[0] for case in OVERFLOWS])  # fmt: skip
def test_weights_that_overflow_the_serving_dtype_are_refused(
    url: str, adapters: dict[str, Path], label: str, changes: dict, factors: tuple, needle: str
) -> None:
    one = adapters["one"]
    parts = _parts(one, _config_with(one, **changes), _scaled_weights(one, *factors))
    error = _error(upload_parts(url, "overflow", "v1", parts), 400, "invalid_adapter", needle)
    assert "NaN or Inf" in error["message"] or "float32" in error["message"], error


def test_large_but_finite_weights_are_served(url: str, adapters: dict[str, Path]) -> None:
    """The rule refuses overflow, not size: A and B each x 10 are accepted and served."""
    one = adapters["one"]
    parts = _parts(one, weights=_scaled_weights(one, 10.0, 10.0))
    assert upload_parts(url, "large", "v1", parts).status_code == 201
    response = _complete(url, "large")
    assert response.status_code == 200 and isinstance(response.json()["choices"][0]["text"], str)


# ---- item 9: concurrent PUTs of one task@version ------------------------------------------------


def _concurrent_puts(url: str, task: str, bodies: list[list]) -> list[httpx.Response]:
    """PUT every body to task/v1 at the same moment (one thread each, released by a barrier)."""
    barrier = threading.Barrier(len(bodies))
    responses: list[httpx.Response | None] = [None] * len(bodies)

    def put(i: int) -> None:
        barrier.wait()
        responses[i] = upload_parts(url, task, "v1", bodies[i])

    threads = [threading.Thread(target=put, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(r is not None for r in responses)
    return responses  # type: ignore[return-value]


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_identical_puts_create_once(
    url: str, adapters: dict[str, Path], data_dir: Path, round_: int
) -> None:
    task = f"race{round_}"
    responses = _concurrent_puts(url, task, [adapter_parts(adapters["one"])] * 8)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 7 + [201], [r.text for r in responses]
    assert len({r.json()["sha256"] for r in responses}) == 1
    assert all(r.json()["stable"] is True for r in responses)
    snapshot = registry_snapshot(data_dir)
    assert [row for row in snapshot["rows"] if row[0] == task] == [
        (task, "v1", responses[0].json()["sha256"])
    ]
    assert (task, "v1") in snapshot["stable"] and snapshot["tmp"] == []
    models = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
    assert models.count(task) == 1 and models.count(f"{task}@v1") == 1
    assert _complete(url, task).status_code == 200


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_puts_of_two_contents_one_wins(
    url: str, adapters: dict[str, Path], data_dir: Path, round_: int
) -> None:
    task = f"clash{round_}"
    contents = {"one": adapter_parts(adapters["one"]), "two": adapter_parts(adapters["two"])}
    order = ["one", "two"] * 4 if round_ % 2 == 0 else ["two", "one"] * 4
    responses = _concurrent_puts(url, task, [contents[name] for name in order])
    created = [(name, r) for name, r in zip(order, responses, strict=True) if r.status_code == 201]
    assert len(created) == 1, [r.status_code for r in responses]
    winner, winning = created[0]
    for name, response in zip(order, responses, strict=True):
        if response is winning:
            continue
        if name == winner:
            assert (
                response.status_code == 200
                and response.json()["sha256"] == winning.json()["sha256"]
            )
        else:
            _error(response, 409, "conflict", "different content")
    snapshot = registry_snapshot(data_dir)
    assert [row for row in snapshot["rows"] if row[0] == task] == [
        (task, "v1", winning.json()["sha256"])
    ]
    stored = {row[2] for row in snapshot["rows"]}
    assert set(snapshot["blobs"]) == stored and snapshot["tmp"] == []


# ---- item 10: a data directory that cannot be written, or is full --------------------------------

FSIZE_LIMIT = 1 << 20
"""The subprocess server's file size limit: above its database, below the big adapter."""
LIMITED_LAUNCHER = r"""
import ctypes, os, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if os.geteuid() == 0:  # drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: gone after exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap}) failed")
os.execv(sys.executable, [sys.executable, "-m", "peftserve.cli", *sys.argv[2:]])
"""
"""Runs ``peftserve <args>`` under the storage limits. A launcher process rather than a
``preexec_fn``: this test process has threads (the module's server), and ``preexec_fn`` is
not safe with threads."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def limited_server(model_dir: Path, adapters: dict[str, Path], tmp_path: Path):
    """A ``peftserve serve`` subprocess with the storage limits above; yields (url, data_dir)."""
    data = tmp_path / "data"
    port = _free_port()
    argv = [sys.executable, "-c", LIMITED_LAUNCHER, str(FSIZE_LIMIT),
            "serve", "--model", str(model_dir), "--device", "cpu", "--port", str(port), "--data-dir", str(data),
            "--adapter", f"keep={adapters['alpha']}", "--served-model-name", "base",
            "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "server.log").read_text())
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_for(healthy, timeout=180), (tmp_path / "server.log").read_text()
        yield url, data
    finally:
        for path in (data, data / "blobs", data / "tmp"):
            if path.exists():
                path.chmod(0o755)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def _make_read_only(data: Path) -> Callable[[], None]:
    paths = [data, data / "blobs", data / "tmp"]
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in paths}
    for path in paths:
        path.chmod(0o555)
    return lambda: [path.chmod(mode) for path, mode in modes.items()]


@pytest.mark.timeout(300)
def test_full_and_read_only_data_dir(
    limited_server: tuple[str, Path], adapters: dict[str, Path], model_dir: Path, tmp_path: Path
) -> None:
    url, data = limited_server
    assert upload_parts(url, "keep", "v2", adapter_parts(adapters["one"])).status_code == 201
    before = registry_snapshot(data)

    # Full: the big adapter's weights pass the file size limit while they are written.
    big = make_peft_adapter(model_dir, tmp_path / "big", r=160, seed=9, target_modules="all-linear")
    assert (big / WEIGHTS).stat().st_size > FSIZE_LIMIT
    response = upload_parts(url, "big", "v1", adapter_parts(big))
    _error(response, 507, "insufficient_storage", "data directory is full", "EFBIG",
           "nothing was stored")  # fmt: skip
    assert registry_snapshot(data) == before

    # Read-only: no upload, and a DELETE that changes nothing (the version is still served).
    restore = _make_read_only(data)
    try:
        response = upload_parts(url, "new", "v1", adapter_parts(adapters["two"]))
        _error(response, 503, "storage_unavailable", "not writable", "EACCES", "nothing was stored")
        response = httpx.delete(f"{url}/admin/adapters/keep/v2", timeout=30)
        _error(
            response, 503, "storage_unavailable", "keep@v2", "not writable", "nothing was deleted"
        )
        assert registry_snapshot(data) == before
        assert _complete(url, "keep@v2").status_code == 200
        shown = httpx.get(f"{url}/admin/adapters/keep/v2", timeout=10).json()
        assert shown["status"] != "unservable", shown
    finally:
        restore()

    # Writable again: the same DELETE happens entirely, and says so.
    response = httpx.delete(f"{url}/admin/adapters/keep/v2", timeout=30)
    assert response.status_code == 200 and response.json()["deleted"] is True, response.text
    after = registry_snapshot(data)
    gone = [row for row in before["rows"] if row[:2] == ("keep", "v2")][0][2]
    assert gone not in after["blobs"] and after["tmp"] == []
    assert set(after["blobs"]) == {row[2] for row in after["rows"]}
    _error(_complete(url, "keep@v2"), 404, "model_not_found")
    assert upload_parts(url, "new", "v1", adapter_parts(adapters["two"])).status_code == 201
    database = [p.stat().st_size for p in data.glob("peftserve.db*")]
    assert max(database) < FSIZE_LIMIT // 2, database  # the limit hit the adapter, not the database
