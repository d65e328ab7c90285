"""Scaling on Ray Serve: throughput of 2 engine replicas over 1 (1 CPU each), mixed workload.

A program, not a test. The model, adapters and requests are ``bench/throughput.py``'s mixed
workload (27M-parameter random Llama, 32 rank-16 adapters served as 32 tasks, 128 requests
with zipf(1.2) adapter popularity, prompts of 16-256 token ids, 8-128 new tokens, greedy,
``ignore_eos``). For each replica count it deploys ``peftserve serve --ray`` on a local Ray
(one ingress replica, the controller, N engine replicas of 1 CPU each), warms every task up,
then sends all requests at once over HTTP (``/v1/completions`` with token-id prompts) and
times them until the last answer. Configurations are interleaved ``--repeat`` times; the
fastest run of each counts. It prints generated tokens/s per configuration and their ratio,
with the machine's load average around each run and the engine replicas' CPU seconds (from
their reports: tokens per engine CPU-second show whether replication adds work).

The peer measured in the same run is the machine itself: before each Ray run, one and then two
processes multiply the model's hidden-size matrices on one torch thread each for a few seconds
(``machine_parallelism``). Their ratio is what two 1-CPU replicas could get over one on this
machine at that moment; on an idle 2-core machine it is about 2, on a shared one less.

    python bench/ray_scaling.py --repeat 2 --json /tmp/ray_scaling.json
    python bench/ray_scaling.py --smoke      # tiny model, 8 requests: checks the program runs

``--smoke`` runs every step on a 2-layer model with 4 adapters and 8 short requests (its
figures mean nothing); ``tests/test_bench_ray_scaling.py`` checks the preparation and the
settings without starting Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (  # noqa: E402
    CPU_SHAPE,
    SMOKE_SHAPE,
    make_adapters,
    make_model,
    mixed_workload,
)

logger = logging.getLogger("bench.ray_scaling")
PORT = 8790


@dataclass
class Workload:
    """The base model and adapters on disk, the timed requests and the warm-up requests."""

    base: Path
    adapters: list[Path]
    requests: list[dict]
    warm: list[dict]


def prepare(root: Path, seed: int, smoke: bool = False) -> Workload:
    """The mixed workload's model, 32 adapters and 128 requests under ``root`` (``smoke``: a
    2-layer model, 4 adapters, 8 short requests)."""
    rng = np.random.default_rng(seed)
    shape, n_adapters = (SMOKE_SHAPE, 4) if smoke else (CPU_SHAPE, 32)
    cpu = torch.device("cpu")
    base = make_model(root, shape, seed, torch.float32, cpu)
    adapters = make_adapters(root, base, n_adapters, 16, seed + 1, cpu)
    reqs = mixed_workload(rng, shape.vocab, n=8 if smoke else 128, n_adapters=n_adapters)
    requests = [{"model": f"a{r.adapter}", "prompt": r.prompt[:16] if smoke else r.prompt,
                 "max_tokens": min(r.max_tokens, 8) if smoke else r.max_tokens, "temperature": 0,
                 "ignore_eos": True} for r in reqs]  # fmt: skip
    warm = [{"model": f"a{i}", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}
            for i in range(n_adapters)]  # fmt: skip
    return Workload(base, adapters, requests, warm)


def settings_for(
    base: Path, adapters: list[Path], data_dir: str, replicas: int, max_ongoing: int, ingress: int,
    kv_gb: float = 1.0,
):  # fmt: skip
    from peftserve.cli import build_parser, serve_settings

    argv = ["serve", "--ray", "--model", str(base), "--device", "cpu", "--data-dir", data_dir,
            "--engine-replicas", str(replicas), "--engine-num-cpus", "1", "--ingress-replicas", str(ingress),
            "--engine-max-ongoing-requests", str(max_ongoing), "--max-tasks-per-replica", "32",
            "--max-loras", "32", "--max-lora-rank", "16", "--max-num-seqs", "128",
            "--max-num-batched-tokens", "4096", "--kv-cache-memory-gb", str(kv_gb), "--log-level", "warning"]  # fmt: skip
    for i, path in enumerate(adapters):
        argv += ["--adapter", f"a{i}={path}"]
    return serve_settings(build_parser().parse_args(argv), environ={})


async def send_all(url: str, requests: list[dict]) -> tuple[float, int]:
    """Send every request at once; (seconds until the last answer, generated tokens)."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        answers = await asyncio.gather(*(http.post("/v1/completions", json=r) for r in requests))
        elapsed = time.perf_counter() - start
    bad = [a for a in answers if a.status_code != 200]
    if bad:
        raise RuntimeError(
            f"{len(bad)} requests failed; first: {bad[0].status_code} {bad[0].text[:200]}"
        )
    return elapsed, sum(a.json()["usage"]["completion_tokens"] for a in answers)


def _matmuls(seconds: float, out: Any) -> None:
    torch.set_num_threads(1)
    a = torch.randn(512, 1376)
    b = torch.randn(1376, 512)
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ b
        n += 1
    out.put(n)


def machine_parallelism(seconds: float = 4.0) -> float:
    """Work done by two single-threaded CPU-bound processes over one, in the same wall time."""
    ctx = multiprocessing.get_context("spawn")
    counts = []
    for workers in (1, 2):
        queue = ctx.Queue()
        procs = [ctx.Process(target=_matmuls, args=(seconds, queue)) for _ in range(workers)]
        for p in procs:
            p.start()
        counts.append(sum(queue.get() for _ in procs))
        for p in procs:
            p.join()
    return counts[1] / counts[0]


def _fleet(settings) -> Any:
    from ray import serve

    from peftserve.server.ray_app import APP_NAME

    time.sleep(2 * settings.ray.snapshot_interval_s)  # the replicas' latest reports are in
    return (
        serve.get_deployment_handle("Controller", APP_NAME).sync.remote("bench", []).result().fleet
    )


def run_once(settings, requests: list[dict], warm: list[dict]) -> dict:
    from ray import serve

    from peftserve.server.ray_app import APP_NAME, application

    t0 = time.perf_counter()
    serve.run(application(settings), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{PORT}"
    asyncio.run(send_all(url, warm))  # every task loaded somewhere, every code path warm
    before = _fleet(settings).per_replica
    load_before = os.getloadavg()[0]
    seconds, tokens = asyncio.run(send_all(url, requests))
    load_after = os.getloadavg()[0]
    after = _fleet(settings).per_replica
    serve.delete(APP_NAME)
    cpu_s = sum(after[n]["cpu_s"] - before.get(n, {}).get("cpu_s", 0.0) for n in after)
    row = {
        "engine_replicas": settings.ray.engine_replicas, "seconds": seconds, "tokens": tokens,
        "tok_s": tokens / seconds, "requests": len(requests), "load_before": load_before,
        "load_after": load_after, "deploy_s": 0.0, "engine_cpu_s": cpu_s,
        "tokens_per_engine_cpu_s": tokens / cpu_s if cpu_s > 0 else None,
        "split": {name: dict(v) for name, v in after.items()},
    }  # fmt: skip
    row["deploy_s"] = time.perf_counter() - t0 - seconds
    logger.info(
        "%s", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeat", type=int, default=1, help="interleaved repetitions; the fastest of each counts"
    )
    parser.add_argument("--max-ongoing", type=int, default=64, help="--engine-max-ongoing-requests")
    parser.add_argument(
        "--ingress",
        type=int,
        default=1,
        help="--ingress-replicas (the same in both configurations)",
    )
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model and workload: checks the program runs"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.manual_seed(args.seed)
    import ray
    from ray import serve

    with tempfile.TemporaryDirectory() as tmp:
        work = prepare(Path(tmp), args.seed, args.smoke)
        ray.init(
            num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
        )
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        rows = []
        try:
            for _ in range(args.repeat):
                for replicas in (1, 2):
                    machine = machine_parallelism(0.5 if args.smoke else 4.0)
                    with tempfile.TemporaryDirectory(dir=tmp) as data_dir:
                        settings = settings_for(work.base, work.adapters, data_dir, replicas, args.max_ongoing,
                                                args.ingress, 0.125 if args.smoke else 1.0)  # fmt: skip
                        row = run_once(settings, work.requests, work.warm)
                        rows.append({**row, "machine_2_over_1": machine})
        finally:
            serve.shutdown()
            ray.shutdown()
    best = {
        n: max((r for r in rows if r["engine_replicas"] == n), key=lambda r: r["tok_s"])
        for n in (1, 2)
    }
    print(
        f"\nmachine: {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(f"{'engine replicas':<18}{'tok/s':>10}{'seconds':>10}{'tok/engine-CPU-s':>18}{'load before':>13}"
          f"{'load after':>12}{'machine 2/1':>13}")  # fmt: skip
    for n, r in best.items():
        per_cpu = r["tokens_per_engine_cpu_s"] or float("nan")
        print(f"{n:<18}{r['tok_s']:>10.1f}{r['seconds']:>10.2f}{per_cpu:>18.1f}{r['load_before']:>13.1f}"
              f"{r['load_after']:>12.1f}{r['machine_2_over_1']:>13.2f}")  # fmt: skip
    ratio = best[2]["tok_s"] / best[1]["tok_s"]
    machine = np.mean([r["machine_2_over_1"] for r in rows])
    print(
        f"2 replicas / 1 replica: {ratio:.2f}x (target >= 1.6x); the machine's own 2/1: {machine:.2f}x; "
        f"efficiency {ratio / machine:.2f}"
    )
    for name, split in best[2]["split"].items():
        print(
            f"  replica {name}: {split['generated_tokens']:.0f} tokens in {split['steps']:.0f} steps, "
            f"{split['tasks']:.0f} tasks"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "ratio": ratio, "machine": machine}, indent=2)
        )


if __name__ == "__main__":
    main()
