"""Decode steps at batch-size buckets over the step buffers, replayed from CUDA graphs.

A decode-only step of ``n`` sequences runs padded to the smallest bucket ``B >= n`` (see
``ModelRunner.prepare``), so its shapes, and the addresses of every input (views of the
step buffers), are those of the bucket. With ``capture``, the forward of a bucket (one graph
with the LoRA kernels, one without) is captured the first time the bucket is used, right
after one eager run of that same step (which compiles and tunes the kernels for its shapes;
running a decode step twice is harmless: it writes the same K/V to the same slots), and
replayed from then on. Prefill and mixed steps always run eagerly. A capture that fails
switches the graphs off for good with one log line; the step then runs eagerly.

Without ``capture`` the same padded steps run eagerly: the CPU twin of the graphs, so the
padding and bucketing are tested where there is no GPU.

As in nano-vllm's ``capture_cudagraph`` and vLLM, all buckets share one memory pool.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STEP = 16


def decode_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to (and including) ``max_num_seqs``."""
    buckets = [b for b in SMALL_BUCKETS if b < max_num_seqs]
    buckets += range(BUCKET_STEP, max_num_seqs, BUCKET_STEP)
    return sorted(set(buckets)) + [max_num_seqs]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [B, V], written by every replay


class DecodeGraphs:
    """Padded decode steps: captured CUDA graphs (``capture``) or their eager twin."""

    def __init__(
        self, forward: Callable[[Any], torch.Tensor], buckets: list[int], capture: bool
    ) -> None:
        self.buckets = buckets
        self.capture = capture
        self.broken = False
        """A capture failed: the caller should stop padding (everything runs eagerly)."""
        self._forward = forward
        self._graphs: dict[tuple[int, bool], _Captured] = {}
        self._pool: Any = None
        self.steps_by_bucket: Counter[int] = Counter()
        """Padded decode steps run, per bucket."""

    @property
    def num_captured(self) -> int:
        return len(self._graphs)

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest bucket that holds ``num_seqs`` sequences (None: too many)."""
        i = bisect.bisect_left(self.buckets, num_seqs)
        return self.buckets[i] if i < len(self.buckets) else None

    def run(self, bucket: int, has_lora: bool, inputs: Any) -> torch.Tensor:
        """The logits [bucket, V] of a padded decode step whose inputs are in the buffers."""
        key = (bucket, has_lora)
        self.steps_by_bucket[bucket] += 1
        entry = self._graphs.get(key)
        if entry is not None:
            entry.graph.replay()
            return entry.logits
        logits = self._forward(inputs)
        if self.capture:
            entry = self._capture(key, inputs)
            if entry is not None:
                entry.graph.replay()
                return entry.logits
        return logits

    def _capture(self, key: tuple[int, bool], inputs: Any) -> _Captured | None:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._forward(inputs)
        except Exception as exc:  # any failure: eager from now on, never a crash
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            logger.warning(
                "CUDA graph capture of a decode step (batch %d) failed, decode runs eagerly: %s: %s",
                key[0], type(exc).__name__, first_line,
            )  # fmt: skip
            self.capture = False
            self.broken = True
            self._graphs.clear()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return None
        if self._pool is None:
            self._pool = graph.pool()
        entry = self._graphs[key] = _Captured(graph, logits)
        logger.debug("captured the decode graph of batch %d (LoRA %s)", *key)
        return entry
