"""Incremental detokenization and stop strings (the postprocess stage of a step)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from peftserve.engine.sequence import Sequence

_PREFIX_TOKENS = 5
"""Prompt tokens decoded in front of the first generated one, so a leading space survives."""


class Detokenizer:
    """Turns each sequence's new tokens into text, cuts stop strings and holds back any
    text that could still become the start of a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}

    def start(self, seq: Sequence) -> None:
        """Set the decode window of a new sequence."""
        seq.read_offset = seq.num_prompt_tokens
        seq.prefix_offset = max(0, seq.num_prompt_tokens - _PREFIX_TOKENS)

    def update(self, seq: Sequence) -> bool:
        """Append the text of ``seq``'s newest tokens; True if a stop string ended it."""
        before = len(seq.output_text)
        seq.output_text += self._decode_delta(seq)
        return _cut_stop(seq, before)

    def take_text(self, seq: Sequence, final: bool) -> str:
        """The text not sent yet, minus what could be the prefix of a stop string."""
        end = len(seq.output_text) if final else len(seq.output_text) - _held_back(seq)
        text = seq.output_text[seq.num_emitted_chars : end]
        seq.num_emitted_chars = max(seq.num_emitted_chars, end)
        return text

    def token_text(self, token_id: int) -> str:
        """Display text of one token (cached)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    def _decode_delta(self, seq: Sequence) -> str:
        ids = seq.token_ids
        decode = self.tokenizer.decode
        prefix = decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
        full = decode(ids[seq.prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)
        return full[len(prefix) :]


def _cut_stop(seq: Sequence, before: int) -> bool:
    """Cut ``output_text`` at the first stop string that ends after ``before``."""
    text = seq.output_text
    cut = -1
    for stop in seq.params.stop:
        idx = text.find(stop, max(0, before - len(stop) + 1))
        if idx != -1 and (cut == -1 or idx < cut):
            cut = idx
    if cut == -1:
        return False
    seq.output_text = text[:cut]
    return True


def _held_back(seq: Sequence) -> int:
    """Length of the longest end of ``output_text`` that starts some stop string."""
    text = seq.output_text
    hold = 0
    for stop in seq.params.stop:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold
