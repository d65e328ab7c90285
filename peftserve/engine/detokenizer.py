"""Incremental detokenization and stop strings (the text side of a request's output).

It runs off the engine thread (``OutputProcessor``): the step loop hands over token ids only.
"""

from __future__ import annotations

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

    def start(self, prompt_token_ids: list[int], stop: list[str]) -> DetokState:
        """The state of a new request: its decode window starts at the end of the prompt."""
        tail = list(prompt_token_ids[-_PREFIX_TOKENS:])
        return DetokState(token_ids=tail, stop=list(stop), prefix_offset=0, read_offset=len(tail))

    def update(self, state: DetokState, token_id: int) -> bool:
        """Append one generated token's text; True if a stop string ended the text."""
        state.token_ids.append(token_id)
        before = len(state.output_text)
        state.output_text += self._decode_delta(state)
        state.stopped = _cut_stop(state, before)
        return state.stopped

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

    def _decode_delta(self, state: DetokState) -> str:
        ids = state.token_ids
        decode = self.tokenizer.decode
        prefix = decode(ids[state.prefix_offset : state.read_offset], skip_special_tokens=True)
        full = decode(ids[state.prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        state.prefix_offset = state.read_offset
        state.read_offset = len(ids)
        if state.prefix_offset > _TRIM_AT:
            del ids[: state.prefix_offset]
            state.read_offset -= state.prefix_offset
            state.prefix_offset = 0
        return full[len(prefix) :]


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
