"""Prometheus metrics (served at GET /metrics), in a CollectorRegistry owned by the app.

Per served adapter (labels ``task``, ``version``, ``arm``; the base model is task "<base name>",
version "base"): requests by outcome, time to first token, time per output token (one
observation per request: its mean inter-token time), end-to-end latency, and prompt and
generated tokens. ``arm`` says why the version served the request: ``stable`` (the task's
stable version, or a task without a rollout), ``candidate`` (a rollout's candidate),
``pinned`` (the request named ``task@version``) or ``shadow`` (a shadow copy of a stable
request run on the candidate, whose answer was discarded). ``outcome`` is ``ok``,
``client_error`` (refused with a 4xx: a bad parameter, a full queue; says nothing about the
version), ``server_error`` (the engine failed it: what the rollout judge counts as an error)
or ``aborted`` (the client left, the server stopped). Label values come only from the model
table (what the registry holds), after a request's model has been resolved: an unknown model
never makes a series. A deleted version's series are removed. ``*_created`` series are not
exported (they double every counter and histogram and no dashboard reads them).

Engine state is read from ``engine.stats`` at scrape time by ``EngineCollector``: adapter
slots (labelled with the ``device`` that holds them: ``cuda`` or ``cpu``, so a CPU server never
reports GPU slots), adapters by tier (``slot``, ``cpu_cache``, ``disk``), CPU-cache hits and
misses, loads, evictions, running and waiting sequences, KV blocks, and
``peftserve_engine_info`` (device, dtype, base model). Adapter load latency is a histogram fed
by the engine's ``on_adapter_load`` hook. The process and Python collectors (``process_*``,
``python_*``) are registered too. Rollouts (canary weight, state, judgments and decisions by
outcome, last score, probe accuracy and feedback score per arm, shadow copies, per task) come
from ``peftserve.server.canary.RolloutCollector``, read from the controller at scrape time.

``VLLMCollector`` exports the same engine state under vLLM's names, in the shapes the model-server
protocol of the Kubernetes Gateway API Inference Extension defines (``deploy/inference-pool.md``),
so its endpoint picker can route to a peftserve pod: ``vllm:num_requests_waiting`` and
``vllm:num_requests_running`` (sequences), ``vllm:kv_cache_usage_perc`` (and on a CUDA engine its
older name ``vllm:gpu_cache_usage_perc``; a fraction in [0, 1], as vLLM reports it),
``vllm:cache_config_info``
(labels ``block_size``, ``num_gpu_blocks``) and ``vllm:lora_requests_info``: one series whose
value is the scrape's Unix time and whose labels are ``max_lora`` (the adapter slots),
``running_lora_adapters`` (the model names whose adapter holds a slot: ``task@version``, and
``task`` for a task's stable version) and ``waiting_lora_adapters`` (the model names of adapters
that requests wait for), each a comma-separated list without spaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from peftserve.server.errors import APIError, ClientDisconnected

if TYPE_CHECKING:
    from peftserve.engine.engine import AsyncLLMEngine
    from peftserve.engine.outputs import RequestOutput
    from peftserve.server.model_table import ModelTable, Target

logger = logging.getLogger(__name__)

PREFIX = "peftserve"
OUTCOMES = ("ok", "client_error", "server_error", "aborted")
ARMS = ("stable", "candidate", "pinned", "shadow")
LOAD_SOURCES = ("cpu", "disk")
TIERS = {"gpu": "slot", "cpu": "cpu_cache", "disk": "disk"}
"""The engine's tier names -> the ``tier`` label (slots may live on the CPU)."""
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_FINISH_OUTCOMES = {"stop": "ok", "length": "ok", "error": "server_error", "abort": "aborted"}

disable_created_metrics()  # process-wide: prometheus_client reads it when a metric is created


class Metrics:
    """The app's metrics and their registry."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.registry = CollectorRegistry()
        labels = ["task", "version", "arm"]
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests by served adapter, arm and outcome (ok, client_error, server_error, aborted).",
            [*labels, "outcome"], registry=self.registry,
        )  # fmt: skip
        self.ttft = self._histogram(
            "time_to_first_token_seconds",
            "Time from request arrival to its first token.",
            TTFT_BUCKETS,
        )
        self.tpot = self._histogram(
            "time_per_output_token_seconds",
            "Mean time between output tokens, one observation per request.", TPOT_BUCKETS,
        )  # fmt: skip
        self.e2e = self._histogram(
            "e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            E2E_BUCKETS,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.", labels,
            registry=self.registry,
        )  # fmt: skip
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Tokens generated.", labels, registry=self.registry
        )
        self.adapter_load = Histogram(
            f"{PREFIX}_adapter_load_seconds", "Time to load an adapter into a slot, by source (cpu, disk).",
            ["source"], buckets=LOAD_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(EngineCollector(engine))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._lock = threading.Lock()
        self._series: set[tuple[str, str, str]] = set()

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(
            f"{PREFIX}_{name}", doc, ["task", "version", "arm"], buckets=buckets,
            registry=self.registry,
        )  # fmt: skip

    def track(
        self, task: str, version: str, arm: str = "stable", on_finish: FinishHook | None = None
    ) -> RequestTracker:
        """A tracker for one request served by ``task``/``version`` (both from the model table)
        on ``arm`` (one of ``ARMS``)."""
        if arm not in ARMS:
            raise ValueError(f"arm must be one of {', '.join(ARMS)}, not {arm!r}")
        with self._lock:
            new = (task, version, arm) not in self._series
            self._series.add((task, version, arm))
        if new:  # every outcome at 0, so an error ratio reads 0 rather than no data
            for outcome in OUTCOMES:
                self.requests.labels(task, version, arm, outcome)
        return RequestTracker(self, task, version, on_finish, arm=arm)

    def observe_adapter_load(self, lora_id: str, seconds: float, source: str) -> None:
        """The engine's ``on_adapter_load`` hook (called from the engine thread)."""
        self.adapter_load.labels(source if source in LOAD_SOURCES else "other").observe(seconds)
        logger.info("adapter %s loaded from %s in %.3f s", lora_id, source, seconds)

    def forget(self, task: str, version: str) -> None:
        """Remove the series of a deleted version."""
        with self._lock:
            gone = {s for s in self._series if s[:2] == (task, version)}
            self._series -= gone
        for labels in gone:
            for outcome in OUTCOMES:
                _remove(self.requests, *labels, outcome)
            for metric in (
                self.ttft,
                self.tpot,
                self.e2e,
                self.prompt_tokens,
                self.generation_tokens,
            ):
                _remove(metric, *labels)

    def request_counts(self) -> dict[tuple[str, str], dict[str, dict[str, int]]]:
        """Requests so far per (task, version): ``{arm: {outcome: count}}`` (for the web page)."""
        out: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
        for family in self.requests.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                lab = sample.labels
                arms = out.setdefault((lab["task"], lab["version"]), {})
                arms.setdefault(lab["arm"], {})[lab["outcome"]] = int(sample.value)
        return out

    def add_collector(self, collector: Collector) -> None:
        """Export ``collector``'s metrics too (the rollout collector)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _remove(metric: Counter | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def failure_outcome(exc: BaseException) -> str:
    """The outcome of a request that raised ``exc``: aborted (the client left, the server
    stopped it), client_error (refused with a 4xx) or server_error (anything else)."""
    if isinstance(exc, (asyncio.CancelledError, ClientDisconnected)):
        return "aborted"
    if isinstance(exc, APIError):
        if exc.code == "aborted":
            return "aborted"
        if 400 <= exc.status < 500:
            return "client_error"
    return "server_error"


def request_arm(target: Target) -> str:
    """The ``arm`` label of a request served by ``target``: ``pinned`` when it named the version
    (``Target.served_arm``, which the response's ``X-Peftserve-Arm`` header names too)."""
    arm = target.served_arm
    return arm if arm in ARMS else "stable"


FinishHook = Callable[["RequestTracker"], None]
"""Called once with the tracker when its request is recorded (the canary layer's hook)."""


class RequestTracker:
    """Times one request and records it once, with the outcome of its last output.

    It also keeps what the canary layer reads when the request ends (``on_finish``): the
    output's token ids and text, the last output, and the timings. A request with several
    choices (``n``) is one request here: its first token starts the time to first token, its
    tokens add up, it failed if a choice failed, and the text and token ids are choice 0's.
    """

    def __init__(
        self,
        metrics: Metrics,
        task: str,
        version: str,
        on_finish: FinishHook | None = None,
        *,
        arm: str = "stable",
    ) -> None:
        self._metrics = metrics
        self._labels = (task, version, arm)
        self._start = time.perf_counter()
        self._first: float | None = None
        self._last: float | None = None
        self._outs: dict[int, RequestOutput] = {}
        """The last output of each choice."""
        self._done = False
        self.on_finish = on_finish
        self.outcome: str | None = None
        """ok, error or aborted, once recorded."""
        self.token_ids: list[int] = []
        self.text = ""

    def on_output(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if out.token_ids:
            if self._first is None:
                self._first = now
                self._metrics.ttft.labels(*self._labels).observe(now - self._start)
            self._last = now
        if out.index == 0:
            self.token_ids.extend(out.token_ids)
            self.text += out.text
        self._outs[out.index] = out

    @property
    def last_output(self) -> RequestOutput | None:
        """The last output the engine sent (None: the request never reached the engine); with
        several choices, that of the first choice that failed or was cut, else choice 0's."""
        outs = self._outs
        for out in outs.values():
            if not out.finished or out.finish_reason in ("error", "abort"):
                return out
        return outs.get(0) or next(iter(outs.values()), None)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated, every choice together."""
        return sum(out.completion_tokens for out in self._outs.values())

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token."""
        return None if self._first is None else self._first - self._start

    @property
    def e2e(self) -> float | None:
        """Seconds from arrival to the last token."""
        return None if self._last is None else self._last - self._start

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first (of the longest choice: choices are
        generated side by side)."""
        longest = max((out.completion_tokens for out in self._outs.values()), default=0)
        if self._first is None or self._last is None or longest < 2:
            return None
        return (self._last - self._first) / (longest - 1)

    def close(self) -> None:
        """The stream ended: record it with the outcome its last output gives."""
        self.finish()

    def finish(self, outcome: str | None = None) -> None:
        """Record the request (first call only); ``outcome`` defaults to the one of the last output."""
        if self._done:
            return
        self._done = True
        out = self.last_output
        if outcome is None:
            reason = out.finish_reason if out is not None and out.finished else "abort"
            outcome = _FINISH_OUTCOMES.get(reason or "", "error")
        self.outcome = outcome
        self._record(outcome)
        if self.on_finish is not None:
            try:
                self.on_finish(self)
            except Exception:  # accounting must never fail a request
                logger.exception("request finish hook failed")

    def _record(self, outcome: str) -> None:
        out, m, labels = self.last_output, self._metrics, self._labels
        m.requests.labels(*labels, outcome).inc()
        if out is None:
            return
        m.prompt_tokens.labels(*labels).inc(out.prompt_tokens)
        m.generation_tokens.labels(*labels).inc(self.completion_tokens)
        if outcome != "ok" or self.e2e is None:
            return
        m.e2e.labels(*labels).observe(self.e2e)
        if self.tpot is not None:
            m.tpot.labels(*labels).observe(self.tpot)


class EngineCollector(Collector):
    """Engine gauges and counters, read from ``engine.stats`` at every scrape."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self._engine = engine

    def device(self) -> str:
        """Where the adapter slots live: ``cuda``, ``cpu``, ... (``unknown`` for a stand-in engine)."""
        return _device(self._engine)

    def collect(self) -> Iterator[Metric]:
        s = self._engine.stats
        device = self.device()
        info = GaugeMetricFamily(f"{PREFIX}_engine_info", "The engine: the device of its adapter slots "
                                 "and KV cache, and its dtype (always 1).", labels=["device", "dtype"])  # fmt: skip
        dtype = str(getattr(getattr(self._engine, "engine", None), "dtype", "unknown"))
        info.add_metric([device, dtype.removeprefix("torch.")], 1.0)
        yield info
        yield _by_device("adapter_slots_used", "Adapter slots holding an adapter, on the device named "
                         "by the label (cpu on a CPU server).", device, s.gpu_slots_used)  # fmt: skip
        yield _by_device("adapter_slots", "Adapter slots (--max-loras), on the device named by the label.",
                         device, s.gpu_slots_total)  # fmt: skip
        yield _gauge("cpu_cache_adapters", "Adapters in the CPU cache.", s.cpu_cache_used)
        yield _gauge(
            "queue_depth",
            "Requests queued for admission (bounded by --max-waiting).",
            s.num_waiting,
        )
        yield _gauge("num_requests_running", "Sequences in the running batch.", s.num_running)
        yield _gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield _by_device(
            "kv_cache_blocks_used", "KV-cache blocks in use.", device, s.kv_blocks_used
        )
        yield _by_device("kv_cache_blocks", "KV-cache blocks.", device, s.kv_blocks_total)
        yield _counter(
            "cpu_cache_hits", "Adapters made resident from the CPU cache.", s.cpu_cache_hits
        )
        yield _counter(
            "cpu_cache_misses", "Adapters read from disk when needed.", s.cpu_cache_misses
        )
        yield _counter("adapter_loads", "Adapters written into a slot.", s.adapter_loads)
        yield _counter(
            "adapter_evictions", "Adapters moved out of their slot.", s.adapter_evictions
        )
        yield self._adapters_by_tier()

    def _adapters_by_tier(self) -> Metric:
        family = GaugeMetricFamily(
            f"{PREFIX}_adapters",
            "Registered adapters by tier (slot, cpu_cache, disk).",
            labels=["tier"],
        )
        counts = dict.fromkeys(TIERS.values(), 0)
        for tier in self._engine.lora_status().values():
            if tier in TIERS:
                counts[TIERS[tier]] += 1
        for tier, count in counts.items():
            family.add_metric([tier], count)
        return family


class VLLMCollector(Collector):
    """The engine gauges under vLLM's names (the Gateway API Inference Extension's model-server
    protocol; see the module docstring), read from the engine at every scrape."""

    def __init__(self, engine: AsyncLLMEngine, models: ModelTable) -> None:
        self._engine = engine
        self._models = models

    def collect(self) -> Iterator[Metric]:
        s = self._engine.stats
        labels = {"model_name": self._models.base_name, "engine": "0"}
        yield _vllm_gauge("num_requests_running", "Sequences running.", labels, s.num_running)
        yield _vllm_gauge("num_requests_waiting", "Sequences waiting.", labels, s.num_waiting)
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        doc = "KV-cache usage: the fraction of KV-cache blocks in use (1 means 100 percent)."
        yield _vllm_gauge("kv_cache_usage_perc", doc, labels, usage)
        if _device(self._engine) == "cuda":  # a CPU server never names a series gpu
            yield _vllm_gauge("gpu_cache_usage_perc", f"{doc} (the older name)", labels, usage)
        blocks = getattr(getattr(self._engine, "engine", None), "block_manager", None)
        if blocks is not None:
            config = {
                "block_size": str(blocks.block_size),
                "num_gpu_blocks": str(blocks.num_blocks),
            }
            yield _vllm_gauge("cache_config_info", "The KV cache (always 1).", config, 1.0)
        yield self._lora_info(s.gpu_slots_total)

    def _lora_info(self, max_lora: int) -> Metric:
        resident = [i for i, tier in self._engine.lora_status().items() if tier == "gpu"]
        labels = {
            "running_lora_adapters": ",".join(self._names(resident)),
            "max_lora": str(max_lora),
            "waiting_lora_adapters": ",".join(self._names(self._engine.waiting_lora_ids())),
        }
        doc = (
            "Adapters holding a slot (running_lora_adapters), adapters requests wait for "
            "(waiting_lora_adapters), the slots (max_lora); the value is the time of reading."
        )
        return _vllm_gauge("lora_requests_info", doc, labels, time.time())

    def _names(self, lora_ids: Iterable[str]) -> list[str]:
        """The API model names of engine adapters: ``task@version``, and ``task`` when that is
        the task's stable version (its unpinned requests go there)."""
        names: set[str] = set()
        for lora_id in lora_ids:
            task, _, version = lora_id.partition("@")
            names.add(lora_id)
            if self._models.stable(task) == version:
                names.add(task)
        return sorted(names)


def _device(engine: AsyncLLMEngine) -> str:
    """The engine's device type: ``cuda``, ``cpu``, ... (``unknown`` for a stand-in engine)."""
    device = getattr(getattr(engine, "engine", None), "device", None)
    return getattr(device, "type", None) or "unknown"


def _vllm_gauge(name: str, doc: str, labels: dict[str, str], value: float) -> Metric:
    family = GaugeMetricFamily(f"vllm:{name}", doc, labels=list(labels))
    family.add_metric(list(labels.values()), float(value))
    return family


def _by_device(name: str, doc: str, device: str, value: float) -> Metric:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["device"])
    family.add_metric([device], float(value))
    return family


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=float(value))
