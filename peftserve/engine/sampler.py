"""Next-token sampling for one step, vectorized over the step's rows.

The per-row parameters arrive as tensors (``SamplingTensors``: temperature, top-k, top-p,
seeds, the rows that want logprobs), filled once per step by the model runner's step
buffers; the sampler is a short pipeline over them, so a new per-row parameter (penalties,
logit bias) is one more tensor and one more stage.

Rows with a ``logit_bias`` get it added first, then rows with a presence, frequency or
repetition penalty get it applied (vLLM's formulas: the repetition penalty divides the
positive and multiplies the negative logits of the tokens in the prompt or the output, the
frequency penalty is subtracted once per time a token was generated, the presence penalty once
if it was); rows with neither cost nothing. Greedy rows (temperature 0) then take the argmax.
Sampled rows apply temperature, then top-k, then top-p, and draw with the exponential race
``argmax(p / q), q ~ Exp(1)`` (the same distribution as ``multinomial``). Rows without a
seed take their noise from the engine's generator, in one call. Seeded rows take theirs
from a counter-based hash of (seed, index of the token being drawn, vocabulary id), all
seeded rows in one batched call: a seeded request's output depends on its seed and prompt
only, never on the batch it runs in, nor on the device's random state. The choices of an
``n > 1`` request mix their index into the key (choice 0 draws as ``n = 1`` does).
Logprobs come from ``log_softmax`` of the raw fp32 logits (before bias and penalties, as
vLLM reports them). Every result of the step comes back to the host in one transfer (one
device sync).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from peftserve.engine.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF
_MIX_A = 0x7FEB352D
_MIX_B = 0x846CA68B
_GOLDEN = 0x9E3779B9


_INT32_MAX = 2**31 - 1  # the step buffers hold top_k as int32

@dataclass
class SamplingTensors:
    """Per-row sampling parameters of one step (``S`` rows) on the logits' device, and their
    host side (``host``). The runner fills the tensors in its step buffers."""

    temperature: torch.Tensor  # [S] f32, 0 for greedy rows
    top_k: torch.Tensor  # [S] int32, 0 keeps all
    top_p: torch.Tensor  # [S] f32, 1 keeps all
    seed_key: torch.Tensor  # [R] int64 stream key of each seeded row (< 2**32)
    seeded_rows: torch.Tensor  # [R] int64 rows that draw from their seed
    logprob_rows: torch.Tensor  # [L] int64 rows that want logprobs
    host: RowParams
    penalties: PenaltyTensors | None = None
    """The rows with a presence, frequency or repetition penalty (None: no row has one)."""
    bias: LogitBias | None = None
    """The rows with a logit bias (None: no row has one)."""

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        draw_index: list[int],
        device: torch.device,
        histories: list[tuple[list[int], int]] | None = None,
        choices: list[int] | None = None,
        vocab: int = 0,
    ) -> SamplingTensors:
        """Tensors for ``params`` (one per row), built from Python lists (tests, tools).
        ``histories``: each row's (token ids, prompt length), needed by penalties; ``choices``:
        each row's choice index; ``vocab``: the logits' width, needed by penalties."""
        rows = RowParams()
        for i, (p, idx) in enumerate(zip(params, draw_index, strict=True)):
            rows.add(p, idx, choices[i] if choices else 0, histories[i] if histories else None)
        return cls(
            temperature=torch.tensor(rows.temps, dtype=torch.float32, device=device),
            top_k=torch.tensor(rows.top_k, dtype=torch.int32, device=device),
            top_p=torch.tensor(rows.top_p, dtype=torch.float32, device=device),
            seed_key=torch.tensor(rows.seed_keys, dtype=torch.int64, device=device),
            seeded_rows=torch.tensor(rows.seeded_rows, dtype=torch.int64, device=device),
            logprob_rows=torch.tensor(rows.logprob_rows, dtype=torch.int64, device=device),
            host=rows,
            penalties=PenaltyTensors.build(rows, vocab, device),
            bias=LogitBias.build(rows, device),
        )


@dataclass
class PenaltyTensors:
    """Presence, frequency and repetition penalties of the ``P`` rows that have one, and the
    tokens they count (built per step, only when a row has a penalty)."""

    rows: torch.Tensor  # [P] int64 rows of the step
    presence: torch.Tensor  # [P] f32
    frequency: torch.Tensor  # [P] f32
    repetition: torch.Tensor  # [P] f32
    output_ids: torch.Tensor  # [P, Lo] int64 generated tokens, padded with V
    prompt_ids: torch.Tensor | None  # [P, Lp] int64 prompt tokens padded with V; None: no repetition penalty

    @classmethod
    def build(cls, rows: RowParams, vocab: int, device: torch.device) -> PenaltyTensors | None:
        if not rows.penalty_rows:
            return None
        if vocab < 1:
            raise ValueError("penalties need the vocabulary size")
        histories = rows.histories
        outputs = _padded([ids[n:] for ids, n in histories], vocab)
        prompts = _padded([ids[:n] for ids, n in histories], vocab) if rows.any_repetition else None

        def tensor(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)

        return cls(
            rows=torch.tensor(rows.penalty_rows, dtype=torch.int64).to(device, non_blocking=True),
            presence=tensor(rows.presence),
            frequency=tensor(rows.frequency),
            repetition=tensor(rows.repetition),
            output_ids=torch.from_numpy(outputs).to(device, non_blocking=True),
            prompt_ids=None if prompts is None else torch.from_numpy(prompts).to(device, non_blocking=True),
        )


def _padded(token_lists: list[list[int]], pad: int) -> np.ndarray:
    """[len(token_lists), longest] int64, each row's tokens then ``pad``."""
    width = max(1, max(len(ids) for ids in token_lists))
    out = np.full((len(token_lists), width), pad, dtype=np.int64)
    for i, ids in enumerate(token_lists):
        out[i, : len(ids)] = ids
    return out


@dataclass
class LogitBias:
    """Every (row, token, bias) of the step's logit biases, flattened."""

    rows: torch.Tensor  # [B] int64
    tokens: torch.Tensor  # [B] int64
    values: torch.Tensor  # [B] f32

    @classmethod
    def build(cls, rows: RowParams, device: torch.device) -> LogitBias | None:
        if not rows.bias_rows:
            return None
        return cls(
            rows=torch.tensor(rows.bias_rows, dtype=torch.int64).to(device, non_blocking=True),
            tokens=torch.tensor(rows.bias_tokens, dtype=torch.int64).to(device, non_blocking=True),
            values=torch.tensor(rows.bias_values, dtype=torch.float32).to(device, non_blocking=True),
        )


class RowParams:
    """Host side of a step's per-row sampling parameters, accumulated by one ``add`` per row."""

    __slots__ = ("temps", "top_k", "top_p", "seed_keys", "seeded_rows", "logprob_rows", "num_logprobs",
                 "all_greedy", "max_top_k", "any_top_p", "num_unseeded", "penalty_rows", "presence",
                 "frequency", "repetition", "histories", "any_repetition", "bias_rows", "bias_tokens",
                 "bias_values")  # fmt: skip

    def __init__(self) -> None:
        self.temps: list[float] = []
        self.top_k: list[int] = []
        self.top_p: list[float] = []
        self.seed_keys: list[int] = []
        self.seeded_rows: list[int] = []
        self.logprob_rows: list[int] = []
        self.num_logprobs: list[int] = []
        """Top-k logprobs asked for by each of ``logprob_rows``."""
        self.all_greedy = True
        self.max_top_k = 0
        """Largest top-k of a sampled row (0: no row limits it)."""
        self.any_top_p = False
        self.num_unseeded = 0
        """Sampled (non-greedy) rows without a seed."""
        self.penalty_rows: list[int] = []
        """Rows with a presence, frequency or repetition penalty, and theirs (same order)."""
        self.presence: list[float] = []
        self.frequency: list[float] = []
        self.repetition: list[float] = []
        self.histories: list[tuple[list[int], int]] = []
        """Each penalty row's (token ids, prompt length)."""
        self.any_repetition = False
        self.bias_rows: list[int] = []
        """(row, token, bias) of every logit bias, flattened."""
        self.bias_tokens: list[int] = []
        self.bias_values: list[float] = []

    @property
    def num_rows(self) -> int:
        return len(self.temps)

    def add(
        self,
        p: SamplingParams,
        draw_index: int,
        choice: int = 0,
        history: tuple[list[int], int] | None = None,
    ) -> None:
        """Row ``num_rows``: ``p``'s parameters; ``draw_index`` counts the tokens it drew before,
        ``choice`` is its choice index; ``history`` (its token ids and prompt length) is read
        when ``p`` has a penalty."""
        row = len(self.temps)
        if p.logprobs is not None:
            self.logprob_rows.append(row)
            self.num_logprobs.append(p.logprobs)
        if p.logit_bias:
            self.bias_rows.extend([row] * len(p.logit_bias))
            self.bias_tokens.extend(p.logit_bias)
            self.bias_values.extend(p.logit_bias.values())
        if p.penalized:
            if history is None:
                raise ValueError("a row with a penalty needs its token history")
            self.penalty_rows.append(row)
            self.presence.append(p.presence_penalty)
            self.frequency.append(p.frequency_penalty)
            self.repetition.append(p.repetition_penalty)
            self.histories.append(history)
            self.any_repetition = self.any_repetition or p.repetition_penalty != 1.0
        if p.greedy:  # the other parameters do not apply (a tiny temperature counts as 0)
            self.temps.append(0.0)
            self.top_k.append(0)
            self.top_p.append(1.0)
            return
        self.temps.append(p.temperature)
        k = min(p.top_k, _INT32_MAX) if p.top_k > 0 else 0  # any k >= the vocabulary keeps all
        self.top_k.append(k)
        self.top_p.append(p.top_p)
        self.all_greedy = False
        self.max_top_k = max(self.max_top_k, k)
        self.any_top_p = self.any_top_p or p.top_p < 1.0
        if p.seed is None:
            self.num_unseeded += 1
        else:
            self.seeded_rows.append(row)
            self.seed_keys.append(seed_key(p.seed, draw_index, choice))


def _mix32(x: int) -> int:
    """A 32-bit integer hash (the 'lowbias32' finalizer), on Python ints."""
    x ^= x >> 16
    x = (x * _MIX_A) & _MASK32
    x ^= x >> 15
    x = (x * _MIX_B) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int, draw_index: int, choice: int = 0) -> int:
    """The 32-bit stream key of the ``draw_index``-th token drawn under ``seed`` (any int) by
    choice ``choice`` of its request (choice 0: the key of a request with one choice)."""
    seed %= 1 << 64
    key = _mix32(_mix32(_mix32(seed & _MASK32) ^ (seed >> 32)) ^ draw_index)
    return key if choice == 0 else _mix32(key ^ _mix32(choice * _GOLDEN & _MASK32))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32), without overflowing int64."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def _mix32_t(x: torch.Tensor) -> torch.Tensor:
    """``_mix32`` on an int64 tensor of values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_A)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_B)
    return x ^ (x >> 16)


def seeded_exponential(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [R, V] (fp32): row i is a pure function of ``keys[i]`` (one batched call)."""
    cols = torch.arange(vocab, dtype=torch.int64, device=keys.device)  # [V]
    h = _mix32_t((keys[:, None] ^ _mul32(cols, _GOLDEN)[None]) & _MASK32)  # [R, V] in [0, 2**32)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # (0, 1), 24 random bits
    return -torch.log(u)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    finite: list[bool]
    """False where a row's logits held NaN or inf (its token is meaningless)."""
    logprobs: list[tuple[float, list[int], list[float]] | None]
    """Per row: (logprob of the sampled token, top-k ids, their logprobs), if asked for."""


class Sampler:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        """Noise for sampled rows without a seed."""
        self.wait_seconds = 0.0
        """Time spent in the step's one device sync (waiting for the device), summed."""

    def __call__(self, logits: torch.Tensor, st: SamplingTensors) -> SamplerOutput:
        """``logits`` [S, V] fp32, one row per row of ``st``."""
        # One pass: the row max is NaN or +inf iff the row holds NaN or +inf (or is all -inf).
        row_max, token_ids = logits.max(dim=-1)  # [S], [S]
        finite = torch.isfinite(row_max)
        adjusted = logits
        if st.bias is not None or st.penalties is not None:
            adjusted = logits.clone()  # logprobs stay those of the raw logits
            if st.bias is not None:
                b = st.bias
                adjusted.index_put_((b.rows, b.tokens), b.values, accumulate=True)
            if st.penalties is not None:
                apply_penalties(adjusted, st.penalties)
            token_ids = adjusted.argmax(dim=-1)  # [S]
        if not st.host.all_greedy:
            token_ids = self._sample(adjusted, st, token_ids)
        parts = [token_ids.to(torch.float64), finite.to(torch.float64)]  # ids are exact in float64
        k = max(st.host.num_logprobs, default=0)
        if st.host.num_logprobs:
            parts += _logprob_parts(logits, st.logprob_rows, token_ids, k)
        start = time.perf_counter()
        host = torch.cat(parts).tolist()  # the step's one device sync
        self.wait_seconds += time.perf_counter() - start
        return _unpack(host, st.host, k)

    def _sample(
        self, logits: torch.Tensor, st: SamplingTensors, greedy_ids: torch.Tensor
    ) -> torch.Tensor:
        greedy = st.temperature == 0  # [S]
        scaled = logits / torch.where(greedy, 1.0, st.temperature)[:, None]  # [S, V]
        if st.host.max_top_k:
            scaled = apply_top_k(scaled, st.top_k, st.host.max_top_k)
        if st.host.any_top_p:
            scaled = apply_top_p(scaled, st.top_p)
        probs = scaled.softmax(dim=-1)  # [S, V]
        sampled = (probs / self._noise(probs, st)).argmax(dim=-1)  # [S]
        # Sample only from a distribution: a row whose probabilities are not finite or hold no
        # mass (an overflow, not only non-finite logits) falls back to its greedy token.
        usable = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)  # [S]
        return torch.where(greedy | ~usable, greedy_ids, sampled)

    def _noise(self, probs: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        """Exp(1) noise [S, V]: unseeded rows in one call, seeded rows in one more."""
        noise = torch.empty_like(probs)
        if st.host.num_unseeded:
            noise.exponential_(generator=self.generator)
        else:
            noise.fill_(1.0)  # greedy rows ignore it
        if st.host.seeded_rows:
            noise.index_copy_(0, st.seeded_rows, seeded_exponential(st.seed_key, probs.shape[-1]))
        return noise


def _logprob_parts(
    logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor, k: int
) -> list[torch.Tensor]:
    lp = logits.index_select(0, rows).log_softmax(dim=-1)  # [L, V]
    chosen = lp.gather(1, token_ids.index_select(0, rows)[:, None])[:, 0]  # [L]
    top_lp, top_ids = lp.topk(k, dim=-1)  # [L, k]
    return [
        chosen.to(torch.float64),
        top_ids.to(torch.float64).flatten(),
        top_lp.to(torch.float64).flatten(),
    ]


def _unpack(host: list[float], rows: RowParams, k: int) -> SamplerOutput:
    """Split the one host transfer back into ids, finite flags and logprobs."""
    n = rows.num_rows
    ids = [int(x) for x in host[:n]]
    finite = [x != 0.0 for x in host[n : 2 * n]]
    logprobs: list[tuple[float, list[int], list[float]] | None] = [None] * n
    num_lp = len(rows.num_logprobs)
    chosen = host[2 * n : 2 * n + num_lp]
    top_ids = host[2 * n + num_lp : 2 * n + num_lp + num_lp * k]
    top_lp = host[2 * n + num_lp + num_lp * k :]
    for j, (row, want) in enumerate(zip(rows.logprob_rows, rows.num_logprobs, strict=True)):
        top = slice(j * k, j * k + want)
        logprobs[row] = (chosen[j], [int(x) for x in top_ids[top]], top_lp[top])
    return SamplerOutput(ids, finite, logprobs)


def apply_penalties(logits: torch.Tensor, pt: PenaltyTensors) -> None:
    """Apply the penalties of ``pt`` to their rows of ``logits`` [S, V] in place (vLLM's
    formulas, see the module docstring)."""
    rows = logits.index_select(0, pt.rows)  # [P, V]
    num_rows, vocab = rows.shape
    ones = torch.ones_like(pt.output_ids, dtype=logits.dtype)
    counts = torch.zeros(num_rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts = counts.scatter_add_(1, pt.output_ids, ones)[:, :vocab]  # [P, V] times generated
    generated = counts > 0  # [P, V]
    if pt.prompt_ids is not None:
        seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=logits.device)
        seen = seen.scatter_(1, pt.prompt_ids, True)[:, :vocab] | generated  # [P, V]
        rep = pt.repetition[:, None]  # [P, 1]
        rows = torch.where(seen, torch.where(rows > 0, rows / rep, rows * rep), rows)
    rows = rows - pt.frequency[:, None] * counts - pt.presence[:, None] * generated
    logits.index_copy_(0, pt.rows, rows)


def apply_top_k(scaled: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep each row's k largest logits (k = 0: all); ``top_k`` [S] int32."""
    vocab = scaled.shape[-1]
    ks = top_k.clamp(max=vocab).long()  # [S]
    kth = scaled.topk(min(max_top_k, vocab), dim=-1).values  # [S, kmax]
    threshold = kth.gather(1, (ks.clamp(min=1) - 1)[:, None])  # [S, 1]
    threshold = torch.where(ks[:, None] > 0, threshold, torch.full_like(threshold, -float("inf")))
    return scaled.masked_fill(scaled < threshold, -float("inf"))


def apply_top_p(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (per row)."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [S, V]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [S, V]
    drop = mass_before >= top_p[:, None]
    drop[:, 0] = False  # the most likely token always stays (top_p may round to 0 in fp32)
    sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
    return torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
