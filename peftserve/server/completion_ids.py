"""Completion ids that say when they were issued.

An id is ``<prefix>-<12 hex digits: issue time in ms since the epoch><20 random hex digits>``
(``cmpl-0194a3...``), as opaque to clients as any OpenAI id. The time is what feedback needs
when records travel: on Ray, an ingress replica pushes the record of a completion to the
controller within a push interval, so feedback sent at once through another replica may arrive
first. The controller reads the issue time from the id: a recent unknown id is waited for, an
old one is answered 404 at once (``CanaryRuntime.record_feedback``). A forged time only makes
its own 404 slower.
"""

from __future__ import annotations

import time
import uuid

_TIME_DIGITS = 12
_RANDOM_DIGITS = 20


def new_completion_id(prefix: str) -> str:
    """A fresh id under ``prefix`` (``cmpl``, ``chatcmpl``) carrying the current time."""
    millis = int(time.time() * 1000) & ((1 << (4 * _TIME_DIGITS)) - 1)
    return f"{prefix}-{millis:0{_TIME_DIGITS}x}{uuid.uuid4().hex[:_RANDOM_DIGITS]}"


def issued_at(completion_id: str) -> float | None:
    """Unix seconds at which ``completion_id`` was issued, or None for an id of another shape."""
    _, sep, body = completion_id.rpartition("-")
    if not sep or len(body) != _TIME_DIGITS + _RANDOM_DIGITS:
        return None
    try:
        int(body, 16)
    except ValueError:
        return None
    return int(body[:_TIME_DIGITS], 16) / 1000.0
