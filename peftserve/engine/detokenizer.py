"""Incremental detokenization and stop strings (the text side of a request's output).

It runs off the engine thread (``OutputProcessor``): the step loop hands over token ids only.
``update_many`` takes one new token for each of many requests and decodes all their windows
in one call of the fast tokenizer's Rust ``decode_batch``, which releases the GIL (so the
engine thread keeps running) and costs a fraction of one Python ``decode`` per window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

_PREFIX_TOKENS = 5
"""Prompt tokens decoded in front of the first generated one, so a leading space survives."""
_TRIM_AT = 64
"""Tokens before the decode window kept at most (older ones are never read again)."""


@dataclass(slots=True)
class DetokState:
    """One request's text so far and its decode window over ``token_ids``.

    ``token_ids`` holds the last prompt tokens and the generated ones, trimmed as the
    window moves; ``token_ids[prefix_offset:read_offset]`` is the context already turned
    into text, ``token_ids[read_offset:]`` what is not yet.
    """

    token_ids: list[int]
    stop: list[str]
    prefix_offset: int = 0
    read_offset: int = 0
    output_text: str = ""
    """Generated text so far, stop string cut."""
    num_emitted_chars: int = 0
    stopped: bool = False
    """A stop string ended the text."""


class Detokenizer:
    """Turns each request's new tokens into text, cuts stop strings and holds back any
    text that could still become the start of a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}
        self._decode_batch = _batch_decoder(tokenizer)

    def start(self, prompt_token_ids: list[int], stop: list[str]) -> DetokState:
        """The state of a new request: its decode window starts at the end of the prompt."""
        tail = list(prompt_token_ids[-_PREFIX_TOKENS:])
        return DetokState(token_ids=tail, stop=list(stop), prefix_offset=0, read_offset=len(tail))

    def update(self, state: DetokState, token_id: int) -> bool:
        """Append one generated token's text; True if a stop string ended the text."""
        return self.update_many([(state, token_id)])[0]

    def update_many(self, updates: list[tuple[DetokState, int]]) -> list[bool]:
        """``update`` for one token of each of many requests (each state at most once),
        their decode windows in one batched decode."""
        windows: list[list[int]] = []
        for state, token_id in updates:
            ids = state.token_ids
            windows.append(ids[state.prefix_offset : state.read_offset])
            windows.append([*ids[state.prefix_offset :], token_id])
        texts = self._decode_batch(windows)  # may raise: no state has changed yet
        stopped = []
        for i, (state, token_id) in enumerate(updates):
            state.token_ids.append(token_id)
            before = len(state.output_text)
            state.output_text += _delta(state, texts[2 * i], texts[2 * i + 1])
            state.stopped = _cut_stop(state, before)
            stopped.append(state.stopped)
        return stopped

    def take_text(self, state: DetokState, final: bool) -> str:
        """The text not sent yet, minus what could be the prefix of a stop string."""
        end = len(state.output_text) if final else len(state.output_text) - _held_back(state)
        text = state.output_text[state.num_emitted_chars : end]
        state.num_emitted_chars = max(state.num_emitted_chars, end)
        return text

    def token_text(self, token_id: int) -> str:
        """Display text of one token (cached)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text


def _delta(state: DetokState, prefix: str, full: str) -> str:
    """The new text of a decode window (and the window moved past it), or "" while the
    window ends in an incomplete character."""
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""  # an incomplete character: wait for the next token
    state.prefix_offset = state.read_offset
    state.read_offset = len(state.token_ids)
    if state.prefix_offset > _TRIM_AT:
        del state.token_ids[: state.prefix_offset]
        state.read_offset -= state.prefix_offset
        state.prefix_offset = 0
    return full[len(prefix) :]


def _batch_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[list[int]]], list[str]]:
    """``[tokenizer.decode(ids, skip_special_tokens=True) for ids in batch]``, as one Rust
    ``decode_batch`` when that gives the same strings: a fast tokenizer that applies no
    Python clean-up after decoding."""
    backend = (
        getattr(tokenizer, "backend_tokenizer", None)
        if getattr(tokenizer, "is_fast", False)
        else None
    )
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda batch: backend.decode_batch(batch, skip_special_tokens=True)
    return lambda batch: [tokenizer.decode(ids, skip_special_tokens=True) for ids in batch]


def _cut_stop(state: DetokState, before: int) -> bool:
    """Cut ``output_text`` at the first stop string that ends after ``before``."""
    text = state.output_text
    cut = -1
    for stop in state.stop:
        idx = text.find(stop, max(0, before - len(stop) + 1))
        if idx != -1 and (cut == -1 or idx < cut):
            cut = idx
    if cut == -1:
        return False
    state.output_text = text[:cut]
    return True


def _held_back(state: DetokState) -> int:
    """Length of the longest end of ``output_text`` that starts some stop string."""
    text = state.output_text
    hold = 0
    for stop in state.stop:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold
