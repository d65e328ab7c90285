"""Canary simulation: the real rollout controller on a fake clock, 500 rollouts per case.

What runs is production code: :class:`peftserve.canary.controller.RolloutController` with its
default configuration (a round every 10 s, 5 probe prompts per round), the real
:class:`~peftserve.canary.metrics.MetricWindows`, judge, decision rule, plan and
:class:`~peftserve.canary.store.RolloutStore` (SQLite in a temporary directory), and the real
routing rule (:func:`peftserve.canary.router.bucket` below :func:`~peftserve.canary.router.threshold`,
checked against :meth:`Router.route` for every user). Only the world is simulated:

* traffic: Poisson arrivals at the case's rate from a user population (uniform, or Zipf for
  heavy users, each with their own output length), recorded in columns
  (:meth:`MetricWindows.record_columns`, the bulk form of ``record``) every round;
* the engine, for the probes (the ``latency`` metric's measurement): each probe step holds the
  requests in flight (Poisson around rate x 0.6 s, Little's law), split between the arms by the
  weight, and costs a base per step, a concave cost in its tokens, a cost per adapter segment
  present, an overhead when two or more adapters share it, 15 % noise. Probes run on twins of
  both versions (extra adapter segments). "Latency +50 %" is a candidate whose every segment
  makes the step cost half a stable-only step more: everyone batched with it pays;
* probes: a greedy eval set; prompt i has a difficulty ``q_i ~ Beta(1.6, 0.4)`` (mean 0.8);
  stable answers it right with probability ``q_i``; the candidate gives stable's answer on 70 %
  of the prompts and answers the others independently, right with probability ``q_i`` scaled so
  that its accuracy drops by the case's d: about 6 % of prompts split equal-quality versions;
* feedback on 30 % of requests: binary (Bernoulli) or graded (Beta, mean as given, sd ~0.2).

Per case it prints the share rolled back, promoted, paused and undecided at the horizon
(2 simulated hours), and the median time and candidate samples (requests + probe answers) to
the decision. ``--quick`` runs a few cases with fewer rollouts (the CI test does).

    python bench/canary_sim.py                      # all cases, 500 rollouts each (~1 h on 2 cores)
    python bench/canary_sim.py --rollouts 100 --cases identical-10 latency+50
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peftserve.canary.controller import (  # noqa: E402
    ControllerConfig,
    ControllerHooks,
    ProbeAnswer,
    RolloutController,
)
from peftserve.canary.metrics import COL, COLUMNS, Columns, MetricWindows  # noqa: E402
from peftserve.canary.router import Router, bucket, routing_key, threshold  # noqa: E402
from peftserve.canary.samples import (  # noqa: E402
    BatchShare,
    RequestRecord,
    length_bucket,
    stratum_of,
    unit_id,
)
from peftserve.canary.spec import AnalysisSpec, MetricSpec, RolloutSpec, default_metrics  # noqa: E402
from peftserve.canary.store import RolloutStore  # noqa: E402

T0 = 1_700_000_000.0
TASK = "sim"
HORIZON_S = 7200.0
REGIONS = 10
AGREE = 0.7
"""Share of eval-set prompts on which the candidate gives stable's own answer (a retrained
adapter of the same task); on the others it answers independently."""


@dataclass(frozen=True)
class Arm:
    """What one version does."""

    error: float = 0.005
    non_finite: float = 0.0005
    step_cost: float = 1.0
    """Multiplier of the adapter's per-step and per-token costs (its own segment)."""
    feedback: float = 0.8
    feedback_segment: float | None = None
    """Feedback mean for users of region r0 (the affected 10 %); None: as everyone."""
    accuracy_drop: float = 0.0
    """Probe accuracy points lost (0.05 = 5 points)."""


@dataclass(frozen=True)
class Case:
    name: str
    rate: float = 10.0
    """Requests per second (mean)."""
    stable: Arm = field(default_factory=Arm)
    candidate: Arm = field(default_factory=Arm)
    users: int = 3000
    zipf: float = 0.0
    """> 0: user activity ~ 1 / rank**zipf, each user with their own output length."""
    surge: bool = False
    """10x the rate for 10 minutes, starting 5 to 25 minutes in."""
    diurnal: bool = False
    """Rate, engine cost and error rate follow a 24 h cycle at a random phase (+-50 %, +-30 %, +-40 %)."""
    eval_set: int = 1000
    feedback_binary: bool = True
    analysis: AnalysisSpec | None = None
    promote_within_s: float = HORIZON_S
    note: str = ""


def _spec_with(**changes: MetricSpec) -> AnalysisSpec:
    return AnalysisSpec(metrics=tuple(changes.get(m.name, m) for m in default_metrics()))


AT_TOLERANCE = _spec_with(
    error_rate=MetricSpec("error_rate", "proportion", "increase", 0.5, mde=1.0, relative=True)
)

CASES: tuple[Case, ...] = (
    Case("identical-1", rate=1.0),
    Case("identical-10", rate=10.0),
    Case("identical-100", rate=100.0),
    Case("identical-surge", rate=10.0, surge=True),
    Case("identical-diurnal", rate=10.0, diurnal=True),
    Case("identical-heavy-users", rate=10.0, zipf=1.1, users=5000),
    Case(
        "identical-rare-events",
        rate=10.0,
        stable=Arm(error=0.005, non_finite=0.002),
        candidate=Arm(error=0.005, non_finite=0.002),
        note="0.5 % errors, 0.2 % non-finite in both",
    ),
    Case(
        "errors-at-tolerance",
        rate=10.0,
        stable=Arm(error=0.01),
        candidate=Arm(error=0.015),
        analysis=AT_TOLERANCE,
        note="relative tolerance 50 %, candidate 1.5x",
    ),
    Case("eval-set-100", rate=10.0, eval_set=100, note="identical quality, 100-prompt greedy set"),
    Case("probes-10pt", rate=10.0, candidate=Arm(accuracy_drop=0.10)),
    Case("probes-5pt", rate=10.0, candidate=Arm(accuracy_drop=0.05)),
    Case("feedback-10pt", rate=10.0, candidate=Arm(feedback=0.7)),
    Case("feedback-5pt-graded", rate=10.0, candidate=Arm(feedback=0.75), feedback_binary=False),
    Case("feedback-5pt-binary", rate=10.0, candidate=Arm(feedback=0.75)),
    Case("errors-0.5-to-2pct", rate=10.0, candidate=Arm(error=0.02)),
    Case("latency+50", rate=10.0, candidate=Arm(step_cost=1.5)),
    Case(
        "segment-10pct-users",
        rate=10.0,
        candidate=Arm(feedback_segment=0.5),
        note="users of one region (10 %) -30 points of feedback",
    ),
    Case(
        "better",
        rate=10.0,
        candidate=Arm(error=0.003, step_cost=0.8, feedback=0.85, accuracy_drop=-0.05),
    ),
)
QUICK = ("identical-10", "latency+50", "probes-10pt", "errors-0.5-to-2pct")


# --------------------------------------------------------------------------- the simulated world


class World:
    """Users, the engine's step costs and the probes' answers for one rollout."""

    BASE_S = 0.015
    TOKEN_S = 4e-5
    SEGMENT_S = 0.0015
    MIX_S = 0.001
    TYPICAL_STEP_S = 0.018
    """A stable-only step; a candidate with ``step_cost`` k adds (k - 1) times it to every step it is in."""
    NOISE = 0.15

    def __init__(self, case: Case, rng: np.random.Generator) -> None:
        self.case = case
        self.rng = rng
        n = case.users
        if case.zipf > 0:
            p = 1.0 / np.arange(1, n + 1) ** case.zipf
            self.activity = p / p.sum()
            self.out_len = rng.lognormal(math.log(30), 0.8, n)
        else:
            self.activity = np.full(n, 1.0 / n)
            self.out_len = rng.lognormal(math.log(30), 0.3, n)
        ids = [f"u{i}" for i in range(n)]
        self.ids = ids
        self.buckets = np.array([bucket(TASK, routing_key(u, {}, "")) for u in ids])
        self.units = np.array([unit_id(routing_key(u, {}, "")) for u in ids], dtype=np.int64)
        self.region = rng.integers(0, REGIONS, n)
        self.region_label = np.array([f"meta:region=r{k}" for k in range(REGIONS)])
        self.phase = rng.uniform(0, 2 * math.pi)
        self.surge_at = rng.uniform(300, 1500)
        q = rng.beta(1.6, 0.4, case.eval_set)
        self.stable_right = rng.random(case.eval_set) < q
        own = rng.random(case.eval_set) < np.clip(
            q * (1 - case.candidate.accuracy_drop / (0.8 * (1 - AGREE))), 0, 1
        )
        self.candidate_right = np.where(rng.random(case.eval_set) < AGREE, self.stable_right, own)

    def rate(self, t: float) -> float:
        r = self.case.rate
        if self.case.surge and self.surge_at <= t < self.surge_at + 600:
            r *= 10
        if self.case.diurnal:
            r *= 1 + 0.5 * math.sin(self.phase + 2 * math.pi * t / 86400)
        return r

    def drift(self, t: float) -> float:
        return (
            1 + 0.3 * math.sin(self.phase + 2 * math.pi * t / 86400) if self.case.diurnal else 1.0
        )

    def error_drift(self, t: float) -> float:
        return (
            1 + 0.4 * math.sin(self.phase + 1 + 2 * math.pi * t / 86400)
            if self.case.diurnal
            else 1.0
        )

    def concurrency(self, t: float) -> float:
        """Requests in flight (Little's law: rate x mean engine time, ~0.6 s)."""
        return min(self.rate(t) * 0.6, 128.0)

    # ---- the engine ------------------------------------------------------------------------

    def step_times(self, t: float, own: str, steps: int, weight: float) -> np.ndarray:
        """Durations of the ``steps`` engine steps of one probe on ``own``'s twin (stable or
        candidate), amid the traffic: each step holds the requests in flight (Poisson, Little's
        law) and so a segment of stable when one of them is stable, of the candidate when one is,
        plus the probe's own twin segment. A segment of a version with ``step_cost`` k adds
        ``(k - 1)`` typical steps to the step: everyone in it pays."""
        rng = self.rng
        busy = self.concurrency(t)
        w = weight / 100.0
        n_c = rng.poisson(busy * w, steps)
        n_s = rng.poisson(busy * (1 - w), steps)
        tokens = (
            n_c + n_s + rng.poisson(busy * 3, steps) + 1.0
        )  # decode tokens, prefill chunks, the probe
        tokens[0] += 16  # the probe's prompt
        segs_c = (n_c > 0) + (own == "candidate")
        segs_s = (n_s > 0) + (own == "stable")
        adapters = segs_c + segs_s
        base = self.BASE_S * self.drift(t) + self.TOKEN_S * tokens**0.9 * 8**0.1
        d = base + self.SEGMENT_S * adapters + self.MIX_S * (adapters >= 2)
        d += self.TYPICAL_STEP_S * (
            (self.case.candidate.step_cost - 1) * segs_c + (self.case.stable.step_cost - 1) * segs_s
        )
        return d * (1 + self.NOISE * rng.standard_normal(steps))

    # ---- one round of traffic -------------------------------------------------------------

    def traffic(self, t0: float, dt: float, weight: float, stratum: str) -> list[Columns]:
        rng, case = self.rng, self.case
        n = rng.poisson(self.rate(t0) * dt)
        if n == 0:
            return []
        users = rng.choice(self.activity.size, size=n, p=self.activity)
        at = t0 + rng.uniform(0, dt, n)
        arm = (self.buckets[users] < threshold(weight)).astype(np.int64)
        out_len = np.maximum(1, np.round(self.out_len[users] * rng.lognormal(0, 0.3, n)))
        prompt = np.maximum(4, np.round(rng.lognormal(math.log(100), 0.7, n)))
        cost = np.where(arm == 1, case.candidate.step_cost, case.stable.step_cost)
        y = (out_len + 1) * self.TYPICAL_STEP_S * self.drift(t0) * cost * rng.lognormal(0, 0.2, n)
        out = []
        for code, version, a in ((0, "v1", case.stable), (1, "v2", case.candidate)):
            sel = arm == code
            m = int(sel.sum())
            if not m:
                continue
            u = users[sel]
            values = np.zeros((m, len(COLUMNS)))
            nf = rng.random(m) < a.non_finite
            err = nf | (rng.random(m) < a.error * self.error_drift(t0))
            values[:, COL["requests"]] = 1
            values[:, COL["errors"]] = err
            values[:, COL["non_finite"]] = nf
            ok = ~err
            values[:, COL["completed"]] = ok
            e2e = y[sel] * (1 + rng.exponential(0.1, m))
            values[:, COL["e2e_n"]] = ok
            values[:, COL["e2e"]] = np.where(ok, e2e, 0)
            values[:, COL["output_tokens"]] = np.where(ok, out_len[sel], 0)
            values[:, COL["finish_stop"]] = ok
            values[:, COL["finish_error"]] = err
            fb = ok & (rng.random(m) < 0.3)
            mean = np.full(m, a.feedback)
            if a.feedback_segment is not None:
                mean = np.where(self.region[u] == 0, a.feedback_segment, mean)
            if case.feedback_binary:
                score = (rng.random(m) < mean).astype(float)
            else:
                k = 3.0  # Beta(mean k, (1 - mean) k): sd ~0.2 at mean 0.8
                score = rng.beta(mean * k, (1 - mean) * k)
                values[:, COL["feedback_graded"]] = fb
            values[:, COL["feedback_n"]] = fb
            values[:, COL["feedback"]] = np.where(fb, score, 0)
            lengths = np.array([length_bucket(int(p)) for p in prompt[sel]])
            out.append(
                Columns(
                    TASK,
                    version,
                    "candidate" if code else "stable",
                    stratum,
                    self.units[u],
                    values,
                    np.ones(m, dtype=bool),
                    at[sel],
                    [self.region_label[self.region[u]], lengths],
                )
            )
        return out

    def probe(self, t: float, version: str, index: int, weight: float) -> ProbeAnswer:
        """A probe of ``version`` (run on its twin): its answer, errors and step times."""
        rng = self.rng
        cand = version == "v2"
        a = self.case.candidate if cand else self.case.stable
        right = (self.candidate_right if cand else self.stable_right)[index % self.case.eval_set]
        steps = 1 + int(rng.poisson(8))
        d = self.step_times(t, "candidate" if cand else "stable", steps, weight)
        nf = rng.random() < a.non_finite
        err = bool(nf or rng.random() < a.error * self.error_drift(t))
        batch = None if err else BatchShare(steps, float(d.sum()), 0)
        record = RequestRecord(
            TASK,
            version,
            0,
            "probe",
            t,
            error=err,
            non_finite=nf,
            finish_reason="stop",
            e2e=None if err else float(d.sum()),
            output_tokens=steps - 1,
            prompt_tokens=16,
            batch=batch,
        )
        return ProbeAnswer("right" if right and not err else "wrong", record)


# --------------------------------------------------------------------------- one rollout


@dataclass
class Outcome:
    state: str
    seconds: float
    candidate_requests: float
    candidate_probes: float
    candidate_feedback: float
    metric: str | None


async def _rollout(case: Case, seed: int, data_dir: str) -> Outcome:
    rng = np.random.default_rng(seed)
    world = World(case, rng)
    clock = [T0]
    now: Callable[[], float] = lambda: clock[0]  # noqa: E731
    store = RolloutStore(data_dir, clock=now)
    windows = MetricWindows(clock=now)
    router = Router()
    router.set_task(TASK, "v1", ["v1", "v2"])

    async def versions(task: str) -> list[str]:
        return ["v1", "v2"]

    async def noop(task: str, version: str) -> None:
        return None

    async def probe(task: str, version: str, prompt: str, temperature: float) -> ProbeAnswer:
        r = router.rollout(TASK)
        return world.probe(clock[0], version, int(prompt.split()[-1]), r.weight if r else 50.0)

    hooks = ControllerHooks(versions, noop, noop, noop, probe)
    controller = RolloutController(
        store, windows, router, hooks, config=ControllerConfig(), clock=now
    )
    spec = RolloutSpec(TASK, "v1", "v2", analysis=case.analysis or AnalysisSpec())
    eval_set = [{"prompt": f"probe {i}", "answer": "right"} for i in range(case.eval_set)]
    try:
        await controller.start(spec, eval_set)
        r = router.rollout(TASK)
        for i in rng.choice(len(world.ids), 50):  # the vectorized rule is the router's
            expected = "v2" if world.buckets[i] < threshold(r.weight) else "v1"
            assert router.route(TASK, user=world.ids[i]).version == expected
        interval = controller.config.interval_s
        state, metric = "undecided", None
        while clock[0] - T0 < HORIZON_S:
            r = router.rollout(TASK)
            weight = r.weight if r is not None else 0.0
            for columns in world.traffic(clock[0], interval, weight, stratum_of(weight)):
                windows.record_columns(columns)
            clock[0] += interval
            await controller.tick()
            status = store.get(TASK)
            assert status is not None
            if status[1].state in ("promoted", "rolled_back", "paused"):
                state = status[1].state
                decisions = store.history(TASK, 1, kinds=["decision"])
                metric = decisions[-1]["payload"].get("metric") if decisions else None
                break
        summary = windows.summary(TASK, "v2") if state in ("undecided", "paused") else None
        if summary is None:
            cand_requests = cand_probes = cand_fb = math.nan
            judgments = store.history(TASK, 1, kinds=["judgment"])
            if judgments:
                ms = judgments[-1]["payload"]["metrics"]
                by = {m["name"]: m for m in ms if not m["segment"]}
                cand_requests = by.get("error_rate", {}).get("samples_candidate", math.nan)
                cand_probes = by.get("probe_accuracy", {}).get("samples_candidate", math.nan)
                cand_fb = by.get("feedback_score", {}).get("samples_candidate", math.nan)
        else:
            cand_requests = summary["in_experiment"]
            cand_probes = summary["probes"]
            cand_fb = summary["feedback"]
        return Outcome(state, clock[0] - T0, cand_requests, cand_probes, cand_fb, metric)
    finally:
        store.close()


def run_one(args: tuple[Case, int]) -> Outcome:
    case, seed = args
    with tempfile.TemporaryDirectory(prefix="canary-sim-", dir=_tmp_root()) as d:
        return asyncio.run(_rollout(case, seed, d))


def _tmp_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# --------------------------------------------------------------------------- cases and report


@dataclass
class CaseResult:
    case: Case
    outcomes: list[Outcome]

    def share(self, state: str, within_s: float | None = None) -> float:
        hits = [
            o
            for o in self.outcomes
            if o.state == state and (within_s is None or o.seconds <= within_s)
        ]
        return len(hits) / len(self.outcomes)

    def median(self, attr: str, state: str | None = None) -> float:
        xs = [getattr(o, attr) for o in self.outcomes if state is None or o.state == state]
        xs = [x for x in xs if x == x]
        return float(np.median(xs)) if xs else math.nan

    def rolled_back_within(self, samples: float, attr: str) -> float:
        hits = [
            o for o in self.outcomes if o.state == "rolled_back" and getattr(o, attr) <= samples
        ]
        return len(hits) / len(self.outcomes)


def run_case(case: Case, rollouts: int, seed: int = 0, workers: int = 1) -> CaseResult:
    jobs = [(case, seed * 1_000_003 + i) for i in range(rollouts)]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            outcomes = pool.map(run_one, jobs, chunksize=max(1, rollouts // (4 * workers)))
    else:
        outcomes = [run_one(j) for j in jobs]
    return CaseResult(case, outcomes)


def _minutes(s: float) -> str:
    return "-" if s != s else f"{s / 60:.1f}"


def _count(x: float) -> str:
    return "-" if x != x else f"{x:.0f}"


HEADER = (
    "| case | rate | rollouts | rolled back | promoted | paused | undecided at 2 h | median min to decision | "
    "median candidate requests / probes / feedback at decision | notes |"
)


def row(r: CaseResult) -> str:
    c = r.case
    decided = [o for o in r.outcomes if o.state != "undecided"]
    med_t = float(np.median([o.seconds for o in decided])) if decided else math.nan
    state = "rolled_back" if r.share("rolled_back") >= r.share("promoted") else "promoted"
    samples = " / ".join(
        _count(r.median(a, state))
        for a in ("candidate_requests", "candidate_probes", "candidate_feedback")
    )
    notes = c.note
    if c.name.startswith("probes-5pt"):
        notes = (
            (notes + "; " if notes else "")
            + f"rolled back within 1,000 candidate probes: {r.rolled_back_within(1000, 'candidate_probes'):.1%}"
        )
    if c.name.startswith("feedback-5pt"):
        notes = (
            (notes + "; " if notes else "")
            + f"rolled back within 1,000 candidate feedback: {r.rolled_back_within(1000, 'candidate_feedback'):.1%}"
        )
    return (
        f"| {c.name} | {c.rate:g}/s | {len(r.outcomes)} | {r.share('rolled_back'):.1%} | {r.share('promoted'):.1%} | "
        f"{r.share('paused'):.1%} | {r.share('undecided'):.1%} | {_minutes(med_t)} | {samples} | {notes} |"
    )


def run_all(
    cases: list[Case], rollouts: int, seed: int, workers: int, deadline_s: float
) -> list[CaseResult]:
    """Every case's rollouts in one pool, interleaved, so that a deadline leaves each case about
    the same number of finished rollouts (reported per case)."""
    jobs = [(c, (seed + i) * 1_000_003 + k) for k in range(rollouts) for i, c in enumerate(cases)]
    results: dict[str, list[Outcome]] = {c.name: [] for c in cases}
    stop = time.monotonic() + deadline_s
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        it = pool.imap(_tagged, jobs, chunksize=1)
        for _ in jobs:
            left = stop - time.monotonic()
            if left <= 0:
                break
            try:
                name, outcome = it.next(timeout=left)
            except multiprocessing.TimeoutError:
                break
            results[name].append(outcome)
        pool.terminate()
    return [CaseResult(c, results[c.name]) for c in cases if results[c.name]]


def _tagged(job: tuple[Case, int]) -> tuple[str, Outcome]:
    return job[0].name, run_one(job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rollouts", type=int, default=500)
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    parser.add_argument(
        "--quick", action="store_true", help=f"cases {', '.join(QUICK)}, 20 rollouts each"
    )
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=0.0,
        help="run all cases in one pool, interleaved, and report what finished by then",
    )
    args = parser.parse_args(argv)
    names = QUICK if args.quick else (args.cases or [c.name for c in CASES])
    rollouts = 20 if args.quick and args.rollouts == 500 else args.rollouts
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    print(
        f"{rollouts} rollouts per case; controller every {ControllerConfig().interval_s:g} s, "
        f"{ControllerConfig().probes_per_tick} probes per round; default analysis; horizon {HORIZON_S / 3600:g} h"
    )
    if args.deadline_s > 0:
        start = time.perf_counter()
        done = run_all(
            [by_name[n] for n in names], rollouts, args.seed, args.workers, args.deadline_s
        )
        print(HEADER)
        print("|---" * (HEADER.count("|") - 1) + "|")
        for result in done:
            print(row(result))
        print(f"({time.perf_counter() - start:.0f} s, {args.workers} workers)", file=sys.stderr)
        return 0
    print(HEADER)
    print("|---" * (HEADER.count("|") - 1) + "|")
    for i, name in enumerate(names):
        start = time.perf_counter()
        result = run_case(by_name[name], rollouts, seed=args.seed + i, workers=args.workers)
        print(row(result), flush=True)
        print(f"  ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
