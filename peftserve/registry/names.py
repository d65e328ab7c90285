"""Validation of task names and versions.

Names and versions are identifiers, never paths: files in the store are addressed by
sha256 only. The rule still keeps them path-inert (no ``/``, no leading ``.``) so they are
safe in logs, URLs and metric labels.
"""

from __future__ import annotations

import re

from peftserve.registry.errors import InvalidName

MAX_NAME_LEN = 64
"""Longest task name or version, in characters."""

_NAME_RE = re.compile(r"[a-z0-9_][a-z0-9_.-]*")


def validate_name(value: object, what: str = "task name") -> str:
    """Return ``value`` if it is a valid task name or version, else raise InvalidName.

    Valid: 1-64 characters from lowercase letters, digits, ``_``, ``-`` and ``.``, not
    starting with ``.`` or ``-``.
    """
    if not isinstance(value, str) or not value:
        raise InvalidName(f"{what} must be a non-empty string")
    if len(value) > MAX_NAME_LEN:
        raise InvalidName(f"{what} {value[:MAX_NAME_LEN]!r}... is longer than {MAX_NAME_LEN} characters")
    if not _NAME_RE.fullmatch(value):
        raise InvalidName(
            f"{what} {value!r} is invalid: use lowercase letters, digits, '_', '-' and '.', "
            "not starting with '.' or '-'"
        )
    return value
