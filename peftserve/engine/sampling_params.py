"""Per-request sampling parameters, validated with errors that name the parameter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_TEMPERATURE = 1e-5
"""Temperatures below this sample as greedy: dividing fp32 logits by a smaller one can
overflow (1e-39 is subnormal in fp32, 5e-324 rounds to 0), and any gap between the two
best logits above 1e-3 makes such a softmax one-hot anyway."""


class InvalidParameter(ValueError):
    """A request parameter is out of range; ``param`` names it (OpenAI's error field)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 (or below ``MIN_TEMPERATURE``) means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) keeps all."""
    seed: int | None = None
    """Same seed and prompt give the same output."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; not included in the output."""
    logprobs: int | None = None
    """Return the top-k log-probabilities of each generated token (0..20)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    score_from: int | None = None
    """Teacher forcing: return the log-probability of every prompt token from this index on
    (each given the tokens before it), computed during the prefill."""
    prompt_logprobs: int | None = None
    """Return the log-probability of every prompt token from the second on (from
    ``score_from`` if set) with its top-k alternatives (0..20), computed during the prefill."""
    n: int = 1
    """Choices generated for the prompt: they share its prefill, then sample independently."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token generated at least once (-2..2)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated (-2..2)."""
    repetition_penalty: float = 1.0
    """Divides positive logits and multiplies negative ones of every token in the prompt or
    generated so far (> 0; 1 changes nothing; above 1 discourages repeats)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of these token ids (-100..100) before anything else."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidParameter("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidParameter("temperature", f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameter("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidParameter("top_k", f"top_k must be -1 (all) or positive, got {self.top_k}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidParameter("seed", f"seed must be a 64-bit integer, got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidParameter("logprobs", f"logprobs must be in 0..20, got {self.logprobs}")
        if self.score_from is not None and self.score_from < 1:
            raise InvalidParameter("score_from", f"score_from must be at least 1, got {self.score_from}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise InvalidParameter("stop", "stop takes up to 4 non-empty strings")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            message = f"prompt_logprobs must be in 0..20, got {self.prompt_logprobs}"
            raise InvalidParameter("prompt_logprobs", message)
        if self.n < 1:
            raise InvalidParameter("n", f"n must be at least 1, got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidParameter(name, f"{name} must be in [-2, 2], got {value}")
        if not 0.0 < self.repetition_penalty < math.inf:
            message = f"repetition_penalty must be above 0, got {self.repetition_penalty}"
            raise InvalidParameter("repetition_penalty", message)
        for token, bias in self.logit_bias.items():
            if not -100.0 <= bias <= 100.0:
                message = f"logit_bias values must be in [-100, 100], got {bias} for token {token}"
                raise InvalidParameter("logit_bias", message)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def scored_from(self) -> int | None:
        """First prompt index whose log-probability the prefill records (None: none)."""
        if self.score_from is not None:
            return self.score_from
        return 1 if self.prompt_logprobs is not None else None

    @property
    def penalized(self) -> bool:
        """Whether a presence, frequency or repetition penalty applies."""
        penalties = (self.presence_penalty, self.frequency_penalty, self.repetition_penalty - 1.0)
        return any(penalties)
