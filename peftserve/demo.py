"""``peftserve demo``: two canary rollouts on the bundled demo model, end to end.

It starts a server (a subprocess of ``peftserve serve`` on the demo model, with a fresh data
directory and fast canary settings), drives synthetic ``reverse`` traffic from many users,
then rolls out the bundled candidates of ``reverse`` in turn:

1. ``reverse@v2`` (as good as v1): ramped through its steps and promoted;
2. ``reverse@v2-regressed`` (labels partly corrupted, ~40% exact match): rolled back.

Both rollouts carry the held-out evaluation set, so the controller probes both versions
and judges exact match beside errors and latency. A live line shows state, weight, the
last judgment and traffic; at the end, each decision is printed with its reason. The
server's rollout page (``/ui``) shows the same story as charts while the demo runs;
``--keep-serving`` leaves the server up afterwards to look at it.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from peftserve.canary.router import bucket, routing_key, threshold
from peftserve.client import Client, PeftserveError
from peftserve.config import DEFAULT_ADAPTERS_DIR

logger = logging.getLogger(__name__)

TASK = "reverse"
CANDIDATES = (("v2", "reverse-v2", "promoted"), ("v2-regressed", "reverse-v2-regressed", "rolled_back"))
SERVER_FLAGS = (
    "--canary-interval-s", "1", "--probes-per-tick", "20", "--probe-max-tokens", "16",
    "--promote-keep-warm-s", "5", "--rollback-keep-warm-s", "5", "--log-level", "warning",
)  # fmt: skip
ROLLOUT = dict(steps=[10, 25, 50], interval=4.0, min_samples=30,
               tolerance={"latency": 0.5}, mde={"error_rate": 0.1, "non_finite": 0.05, "latency": 1.0})
"""Fast settings for a minute-long demo on a shared CPU: the regressed candidate is 60 points
worse on its own task, so large mdes suffice; timings on a busy CPU are noisy, so latency only
has to rule out doubling."""


@dataclass
class Traffic:
    """Synthetic users sending ``reverse`` prompts; counts which version served whom."""

    url: str
    workers: int = 6
    stop: threading.Event = field(default_factory=threading.Event)
    served: Counter = field(default_factory=Counter)
    users_by_version: dict[str, set[str]] = field(default_factory=dict)
    """Users who got a candidate's answer, by version."""
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.workers)]
        for t in threads:
            t.start()
        return threads

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))
                body = {"model": TASK, "prompt": f"reverse: {word}\n", "max_tokens": 12,
                        "temperature": 0, "user": f"user-{rng.randrange(100_000)}"}  # fmt: skip
                try:
                    response = http.post("/v1/completions", json=body)
                except httpx.HTTPError:
                    response = None
                with self.lock:
                    if response is None or response.status_code != 200:
                        self.errors += 1
                    else:
                        version = response.headers.get("x-peftserve-version", "?")
                        self.served[version] += 1
                        if response.headers.get("x-peftserve-arm") == "candidate":
                            self.users_by_version.setdefault(version, set()).add(body["user"])

    def total(self) -> int:
        with self.lock:
            return sum(self.served.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, data_dir: str) -> subprocess.Popen:
    """``peftserve serve`` on the demo model in a subprocess; returns once /health answers."""
    cmd = [sys.executable, "-m", "peftserve.cli", "serve", "--port", str(port), "--data-dir", data_dir, *SERVER_FLAGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().strip()[-500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not become healthy within 120 s")


def run_rollout(client: Client, traffic: Traffic, version: str, timeout_s: float, out) -> str:
    """Start a rollout of ``reverse@version`` and show it live until it ends; return the state."""
    evals = DEFAULT_ADAPTERS_DIR / "eval" / f"{TASK}.jsonl"
    rollout = client.start_rollout(TASK, version, eval_set=evals, **ROLLOUT)
    out.write(f"\nrollout {rollout.rollout_id}: {TASK}@{rollout.stable} (stable) -> {TASK}@{version}, "
              f"steps {ROLLOUT['steps']} %\n")  # fmt: skip
    deadline, start, sent0 = time.monotonic() + timeout_s, time.monotonic(), traffic.total()
    shown: tuple[str, float] | None = None
    while time.monotonic() < deadline:
        rollout = client.rollout(TASK)
        judged = rollout.last_judgment
        verdict = f"{judged.result} {judged.progress:.0%}" if judged and judged.progress is not None else "-"
        rate = (traffic.total() - sent0) / max(time.monotonic() - start, 1e-6)
        line = (f"  {time.monotonic() - start:5.1f}s  {rollout.state:<11} weight {rollout.weight:5.1f}%"
                f"  last judgment {verdict:<14} {rate:6.1f} req/s")  # fmt: skip
        if out.isatty():
            out.write("\r" + line + "   ")
        elif (rollout.state, rollout.weight) != shown:
            out.write(line + "\n")
        shown = (rollout.state, rollout.weight)
        out.flush()
        if not rollout.active:
            break
        time.sleep(0.5)
    out.write("\n")
    return rollout.state


def print_history(client: Client, rollout_id: int, out) -> float:
    """The state changes of one rollout, each with its reason; returns the highest weight."""
    top = 0.0
    for event in client.rollout_history(TASK, kinds=["state"]):
        if event.rollout_id != rollout_id:
            continue
        if event.state_to == "ramping" and event.weight is not None:
            top = max(top, event.weight)
        out.write(f"  {event.time}  {event.state_from or '-':>10} -> {event.state_to:<11} "
                  f"weight {event.weight if event.weight is not None else '-':>5}  {event.reason}\n")  # fmt: skip
    return top


def outside_cohort(users: set[str], top_weight: float) -> list[str]:
    """Users served by the candidate whose bucket lies above the highest weight it reached."""
    limit = threshold(top_weight)
    return sorted(u for u in users if bucket(TASK, routing_key(u, {}, "")) >= limit)


def main(argv: list[str] | None = None, prog: str = "peftserve demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per rollout")
    parser.add_argument("--workers", type=int, default=6, help="concurrent synthetic users")
    parser.add_argument("--keep-serving", action="store_true",
                        help="after the rollouts, keep the server (and its rollout page) up until Ctrl-C")  # fmt: skip
    args = parser.parse_args(argv)
    out = sys.stdout
    os.environ.pop("PEFTSERVE_ADMIN_TOKEN", None)  # the demo server answers admin on loopback
    port = args.port or free_port()
    with tempfile.TemporaryDirectory(prefix="peftserve-demo-") as data_dir:
        out.write(f"starting peftserve on the demo model (127.0.0.1:{port}, data in {data_dir}) ...\n")
        server = start_server(port, data_dir)
        url = f"http://127.0.0.1:{port}"
        out.write(f"watch it in a browser: {url}/ui (the rollout page: weight, judgments, metrics per arm)\n")
        traffic = Traffic(url, workers=args.workers)
        try:
            code = _drive(Client(url), traffic, args.timeout, out)
            if args.keep_serving:
                _keep_serving(server, url, out)
            return code
        except PeftserveError as e:
            out.write(f"\ndemo failed: {e}\n")
            return 1
        finally:
            traffic.stop.set()
            server.terminate()
            server.wait(timeout=30)


def _keep_serving(server: subprocess.Popen, url: str, out) -> None:
    out.write(f"\nthe server stays up: {url}/ui (Ctrl-C stops it)\n")
    out.flush()
    try:
        server.wait()
    except KeyboardInterrupt:
        out.write("\n")


def _drive(client: Client, traffic: Traffic, timeout_s: float, out) -> int:
    for version, folder, _ in CANDIDATES:
        client.upload(DEFAULT_ADAPTERS_DIR / folder, name=TASK, version=version)
    out.write(f"uploaded {', '.join(f'{TASK}@{v}' for v, _, _ in CANDIDATES)}; "
              f"{traffic.workers} synthetic users send '{TASK}' traffic\n")  # fmt: skip
    traffic.start()
    ok = True
    for version, _, expected in CANDIDATES:
        state = run_rollout(client, traffic, version, timeout_s, out)
        top = print_history(client, client.rollout(TASK).rollout_id, out)
        with traffic.lock:
            users = set(traffic.users_by_version.get(f"{TASK}@{version}", ()))
        strays = outside_cohort(users, top)
        verdict = "as expected" if state == expected else f"EXPECTED {expected}"
        out.write(f"=> {TASK}@{version}: {state} ({verdict}); {len(users)} users got its answers as the candidate, "
                  f"{len(strays)} of them outside the {top:g} % cohort\n")  # fmt: skip
        ok &= state == expected and not strays
    traffic.stop.set()
    out.write(f"\ntraffic served by version: {dict(traffic.served)}; errors: {traffic.errors}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
