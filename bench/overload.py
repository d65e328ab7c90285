"""Overload: how fast a 429 and /health answer at 2x capacity, and what waiting requests cost.

A program, not a test. It starts ``peftserve serve`` (the bundled demo model) in its own
process and drives it with a small asyncio HTTP/1.1 client (one keep-alive connection per
simulated user, so the client stays cheap next to the server). Two experiments:

1. waiting cost: closed-loop users sending long non-streamed completions, first as many as
   the engine runs at once (``--max-num-seqs``), then that many plus ``--queued`` more that
   wait in the queue, alternated ``--repeat`` times. Prints generated tokens/s, the server's
   CPU (cores), its event-loop thread's, and tokens per server CPU-second (the machine's
   other load moves tokens/s; this much less): waiting requests should cost nothing, so the
   event loop stays near 0 cores and the per-CPU ratio near 1.
2. overload: ``2 x (max_num_seqs + max_waiting)`` users at once; a refused user retries after
   ``--retry-s``. Prints latency percentiles of the 429s, of the 200s, and of a /health probe
   sent every 0.2 s alongside, with the idle /health latency measured before.

    python bench/overload.py                      # 16 running, 256 waiting, 1000 queued
    python bench/overload.py --duration 30 --max-waiting 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("bench.overload")
HOST = "127.0.0.1"


@dataclass
class Tally:
    latencies: dict[int, list[float]] = field(default_factory=dict)
    """status -> seconds of each answer."""

    def add(self, status: int, seconds: float) -> None:
        self.latencies.setdefault(status, []).append(seconds)


class Connection:
    """One keep-alive HTTP/1.1 connection: just enough protocol for JSON requests."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                return await self._request(method, path, body)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _request(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        await self.writer.drain()
        assert self.reader is not None
        header = await self.reader.readuntil(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(v)
            for k, _, v in (ln.partition(":") for ln in lines[1:])
            if k.lower() == "content-length"
        )
        data = await self.reader.readexactly(length)
        if any(ln.lower() == "connection: close" for ln in lines):
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(port: int, data_dir: str, max_num_seqs: int, max_waiting: int) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "peftserve.cli", "serve", "--device", "cpu", "--port", str(port),
        "--data-dir", data_dir, "--max-num-seqs", str(max_num_seqs),
        "--max-waiting", str(max_waiting), "--log-level", "warning",
    ]  # fmt: skip
    # Not from the repository root: its top-level kernels/ folder would shadow a package.
    return subprocess.Popen(argv, cwd=data_dir)


async def wait_healthy(port: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _ = await Connection(port).request("GET", "/health")
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("server did not become healthy")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process, or of one of its threads (Linux /proc)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def snapshot(pid: int, tokens: int) -> tuple[float, ...]:
    """Generated tokens, server CPU seconds, its event-loop (main) thread's, time."""
    return (tokens, cpu_seconds(pid), cpu_seconds(pid, pid), time.monotonic())


async def engine_stats(port: int) -> dict:
    conn = Connection(port)
    try:
        _, body = await conn.request("GET", "/health")
    finally:
        conn.close()
    return json.loads(body)["engine"]


async def wait_queued(port: int, n: int, timeout: float = 300.0) -> None:
    """Wait until ``n`` requests are running or waiting (0: until none is running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = await engine_stats(port)
        if stats["num_running"] + stats["num_waiting"] >= n if n else stats["num_running"] == 0:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"fewer than {n} requests admitted after {timeout} s")


async def user(port: int, body: bytes, stop: asyncio.Event, tally: Tally, retry_s: float) -> None:
    conn = Connection(port)
    try:
        while not stop.is_set():
            started = time.monotonic()
            status, _ = await conn.request("POST", "/v1/completions", body)
            tally.add(status, time.monotonic() - started)
            if status == 429:
                await asyncio.sleep(retry_s)
    finally:
        conn.close()


async def health_probe(port: int, stop: asyncio.Event, tally: Tally, every_s: float = 0.2) -> None:
    conn = Connection(port)
    while not stop.is_set():
        started = time.monotonic()
        status, _ = await conn.request("GET", "/health")
        tally.add(status, time.monotonic() - started)
        await asyncio.sleep(every_s)
    conn.close()


def completion(max_tokens: int) -> bytes:
    body = {
        "model": "reverse",
        "prompt": "reverse: abcdefgh",
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    return json.dumps(body).encode()


async def run_users(
    port: int, n: int, body: bytes, seconds: float, retry_s: float, warmup_s: float = 0.0
):
    """``n`` closed-loop users for ``seconds``; their tally and a /health probe's."""
    stop = asyncio.Event()
    users, health = Tally(), Tally()
    tasks = [asyncio.create_task(user(port, body, stop, users, retry_s)) for _ in range(n)]
    await asyncio.sleep(warmup_s)
    users.latencies.clear()
    probe = asyncio.create_task(health_probe(port, stop, health))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(probe)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return users, health


async def measure(
    port: int, pid: int, n: int, args: argparse.Namespace
) -> tuple[float, float, float]:
    """Tokens/s, server cores and client cores with ``n`` closed-loop users of long completions."""
    stop = asyncio.Event()
    body = completion(args.max_tokens)
    tasks = [asyncio.create_task(user(port, body, stop, Tally(), args.retry_s)) for _ in range(n)]
    await wait_queued(port, n)
    await asyncio.sleep(args.warmup_s)
    start = snapshot(pid, (await engine_stats(port))["generated_tokens"])
    await asyncio.sleep(args.duration)
    end = snapshot(pid, (await engine_stats(port))["generated_tokens"])
    elapsed = end[-1] - start[-1]
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await wait_queued(port, 0)
    return tuple((b - a) / elapsed for a, b in zip(start[:3], end[:3], strict=True))  # type: ignore[return-value]


async def waiting_cost(port: int, pid: int, args: argparse.Namespace) -> None:
    """Alternate the two loads ``--repeat`` times (the machine's own load drifts)."""
    loads = ((f"{args.max_num_seqs} running", args.max_num_seqs),
             (f"{args.max_num_seqs} running + {args.queued} waiting", args.max_num_seqs + args.queued))  # fmt: skip
    print("\n1. waiting cost (closed-loop users, long completions)")
    print(
        "| round | load | tokens/s | server CPU (cores) | event-loop thread (cores) | tokens per server CPU-s |"
    )
    print("|---|---|---|---|---|---|")
    ratios = []
    for round_ in range(1, args.repeat + 1):
        per_cpu = []
        for label, n in loads:
            tps, server_cores, loop_cores = await measure(port, pid, n, args)
            per_cpu.append(tps / server_cores)
            cells = (
                round_,
                label,
                f"{tps:.1f}",
                f"{server_cores:.2f}",
                f"{loop_cores:.3f}",
                f"{per_cpu[-1]:.0f}",
            )
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
        ratios.append(per_cpu[1] / per_cpu[0])
    print(
        "tokens per CPU-second with waiting / without, per round: "
        + ", ".join(f"{r:.2f}" for r in ratios)
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"| {name} | {len(ms)} | {pct(ms, 0.5):.1f} | {pct(ms, 0.99):.1f} | {max(ms, default=float('nan')):.1f} |"


async def overload(port: int, args: argparse.Namespace) -> None:
    idle = Tally()
    conn = Connection(port)
    for _ in range(20):
        started = time.monotonic()
        status, _ = await conn.request("GET", "/health")
        idle.add(status, time.monotonic() - started)
    conn.close()
    n = 2 * (args.max_num_seqs + args.max_waiting)
    users, health = await run_users(
        port, n, completion(args.max_tokens), args.duration, args.retry_s, args.warmup_s
    )
    print(
        f"\n2. overload: {n} users = 2 x (max_num_seqs {args.max_num_seqs} + max_waiting {args.max_waiting})"
    )
    print("| answer | count | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    print(row("429 (queue full)", users.latencies.get(429, [])))
    print(row("200 (completion)", users.latencies.get(200, [])))
    print(row("/health under overload", [v for vs in health.latencies.values() for v in vs]))
    print(row("/health idle", idle.latencies.get(200, [])))
    other = {s: len(v) for s, v in users.latencies.items() if s not in (200, 429)}
    print(f"other statuses: {other or 'none'}")


async def with_server(args: argparse.Namespace, max_waiting: int, experiment) -> None:
    """Run ``experiment(port, pid)`` against a fresh server whose queue holds ``max_waiting``."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="peftserve-overload-") as data_dir:
        server = start_server(port, data_dir, args.max_num_seqs, max_waiting)
        try:
            await wait_healthy(port)
            await experiment(port, server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)


async def main_async(args: argparse.Namespace) -> None:
    if not args.skip_waiting_cost:
        await with_server(args, args.queued + 1, lambda port, pid: waiting_cost(port, pid, args))
    if not args.skip_overload:
        await with_server(args, args.max_waiting, lambda port, pid: overload(port, args))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument(
        "--max-waiting", type=int, default=256, help="queue bound in the overload experiment"
    )
    parser.add_argument(
        "--queued", type=int, default=1000, help="waiting requests in the waiting-cost experiment"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured per phase")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument(
        "--retry-s", type=float, default=0.5, help="a refused user's pause before retrying"
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="rounds of the waiting-cost experiment"
    )
    parser.add_argument("--skip-waiting-cost", action="store_true")
    parser.add_argument("--skip-overload", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"python {platform.python_version()}")  # fmt: skip
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
