"""Next-token sampling for one step, vectorized over the step's sequences.

Greedy rows take the argmax of the raw logits. Sampled rows apply temperature, then
top-k, then top-p, and draw with the exponential race ``argmax(p / q), q ~ Exp(1)``
(the same distribution as ``multinomial``): a seeded request draws its noise row from its
own generator, so its output depends on its seed and prompt only, never on the batch.
Logprobs come from ``log_softmax`` of the raw fp32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftserve.engine.sequence import Sequence


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
        """Noise for requests without a seed."""

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """``logits`` [S, V] fp32, one row per sequence in ``seqs``."""
        params = [seq.params for seq in seqs]
        # One pass: the row max is NaN or +inf iff the row holds NaN or +inf (or is all -inf).
        row_max, token_ids = logits.max(dim=-1)  # [S], [S]
        finite = torch.isfinite(row_max)
        if not all(p.greedy for p in params):
            token_ids = self._sample(logits, seqs, token_ids)
        logprobs = self._logprobs(logits, seqs, token_ids)
        ids, ok = torch.stack([token_ids, finite.long()]).tolist()  # one device sync
        return SamplerOutput(ids, [bool(x) for x in ok], logprobs)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy_ids: torch.Tensor) -> torch.Tensor:
        params = [seq.params for seq in seqs]
        device = logits.device
        greedy = torch.tensor([p.greedy for p in params], device=device)  # [S]
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
        scaled = logits / temps[:, None]  # [S, V]
        top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
        if any(top_k):
            scaled = _apply_top_k(scaled, top_k)
        top_p = [p.top_p for p in params]
        if any(p < 1.0 for p in top_p):
            scaled = _apply_top_p(scaled, torch.tensor(top_p, device=device))
        probs = scaled.softmax(dim=-1)  # [S, V]
        sampled = (probs / self._noise(probs, seqs)).argmax(dim=-1)  # [S]
        # Sample only from a distribution: a row whose probabilities are not finite or hold no
        # mass (an overflow, not only non-finite logits) falls back to its greedy token.
        usable = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)  # [S]
        return torch.where(greedy | ~usable, greedy_ids, sampled)

    def _noise(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Exp(1) noise [S, V]; seeded rows from their own generators."""
        noise = torch.empty_like(probs)
        seeded = [i for i, seq in enumerate(seqs) if seq.generator is not None]
        if len(seeded) < len(seqs):
            noise.exponential_(generator=self.generator)
        for i in seeded:
            noise[i].exponential_(generator=seqs[i].generator)
        return noise

    def _logprobs(
        self, logits: torch.Tensor, seqs: list[Sequence], token_ids: torch.Tensor
    ) -> list[tuple[float, list[int], list[float]] | None]:
        rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        result: list[tuple[float, list[int], list[float]] | None] = [None] * len(seqs)
        if not rows:
            return result
        idx = torch.tensor(rows, device=logits.device)
        lp = logits.index_select(0, idx).float().log_softmax(dim=-1)  # [R, V]
        chosen = lp.gather(1, token_ids.index_select(0, idx)[:, None])[:, 0].tolist()  # [R]
        k = max(seqs[i].params.logprobs for i in rows)
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())  # [R, k]
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        for j, i in enumerate(rows):
            n = seqs[i].params.logprobs
            result[i] = (chosen[j], top_ids[j][:n], top_lp[j][:n])
        return result


def _apply_top_k(scaled: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Keep each row's k largest logits (k = 0: all)."""
    vocab = scaled.shape[-1]
    ks = torch.tensor([min(k, vocab) for k in top_k], device=scaled.device)  # [S]
    kth = scaled.topk(min(max(top_k), vocab), dim=-1).values  # [S, kmax]
    threshold = kth.gather(1, (ks.clamp(min=1) - 1)[:, None])  # [S, 1]
    threshold = torch.where(ks[:, None] > 0, threshold, torch.full_like(threshold, -float("inf")))
    return scaled.masked_fill(scaled < threshold, -float("inf"))


def _apply_top_p(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (per row)."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [S, V]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [S, V]
    drop = mass_before >= top_p[:, None]
    drop[:, 0] = False  # the most likely token always stays (top_p may round to 0 in fp32)
    sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
    return torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
