"""Registry errors, each with the HTTP status the admin API answers with.

The registry knows nothing of HTTP; ``status`` and ``kind`` let the API layer map any
``RegistryError`` onto a response with one handler (``APIError(err.status, str(err), code=err.kind)``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sqlite3
from collections.abc import Iterator

logger = logging.getLogger(__name__)


class RegistryError(Exception):
    """Base of every error the registry raises on purpose; the message is meant for the user."""

    status: int = 500
    """HTTP status the admin API should answer with."""
    kind: str = "registry_error"
    """Short machine-readable code (the OpenAI-shaped error's ``code``)."""
    param: str | None = None
    """What the error is about, when one thing is (the OpenAI-shaped error's ``param``), e.g.
    ``adapter_config.json.lora_alpha``."""


class InvalidName(RegistryError):
    """A task name or version is not a valid identifier."""

    status = 400
    kind = "invalid_name"


class InvalidAdapter(RegistryError):
    """The adapter's files were refused (the validator's reason, or a refused file type)."""

    status = 400
    kind = "invalid_adapter"


class WrongBaseModel(InvalidAdapter):
    """The adapter was made for another base model (its shapes or its declared fingerprint differ)."""

    kind = "wrong_base_model"


class Conflict(RegistryError):
    """task@version exists with different content, or the version is protected from deletion."""

    status = 409
    kind = "conflict"


class NotFound(RegistryError):
    """No such task or version."""

    status = 404
    kind = "not_found"


class TooLarge(RegistryError):
    """A streamed upload went over its byte limit."""

    status = 413
    kind = "too_large"


class StorageUnavailable(RegistryError):
    """The data directory cannot be written: read-only, not permitted, or an I/O error.

    503: the server cannot change its store now; reads and inference go on. Not a 500 (the
    server did what it should: refused with the cause, nothing changed) nor a 4xx (the
    request was fine). An operator must act (remount, fix permissions), so no Retry-After.
    """

    status = 503
    kind = "storage_unavailable"


class StorageFull(RegistryError):
    """The data directory is out of space (ENOSPC, EDQUOT) or past a file size limit (EFBIG).

    507 Insufficient Storage (RFC 4918): the server cannot store what the request needs.
    """

    status = 507
    kind = "insufficient_storage"


_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file size limit exceeded"}  # fmt: skip
_UNWRITABLE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}  # fmt: skip
_SQLITE_FULL = ("SQLITE_FULL",)
_SQLITE_UNWRITABLE = ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_IOERR")


@contextlib.contextmanager
def storage_errors(action: str, outcome: str) -> Iterator[None]:
    """Raise storage failures inside the block as StorageFull or StorageUnavailable.

    The message says what failed (``action``, e.g. "store the adapter"), the cause, and
    ``outcome`` (what the caller guarantees, e.g. "nothing was stored"). Other errors pass.
    """
    try:
        yield
    except OSError as exc:
        error = _os_error(exc, action, outcome)
        if error is None:
            raise
        logger.error("cannot %s: %s", action, exc)
        raise error from exc
    except sqlite3.Error as exc:
        error = _sqlite_error(exc, action, outcome)
        if error is None:
            raise
        logger.error("cannot %s: database error %s", action, exc)
        raise error from exc


def _os_error(exc: OSError, action: str, outcome: str) -> RegistryError | None:
    name = errno.errorcode.get(exc.errno or 0, "")
    if exc.errno in _FULL:
        return StorageFull(
            f"cannot {action}: the server's data directory is full ({_FULL[exc.errno]}, "
            f"{name}); {outcome}"
        )
    if exc.errno in _UNWRITABLE:
        return StorageUnavailable(
            f"cannot {action}: the server's data directory is not writable "
            f"({_UNWRITABLE[exc.errno]}, {name}); {outcome}"
        )
    return None


def _sqlite_error(exc: sqlite3.Error, action: str, outcome: str) -> RegistryError | None:
    code = getattr(exc, "sqlite_errorname", "") or ""
    if code.startswith(_SQLITE_FULL):
        return StorageFull(
            f"cannot {action}: the server's data directory is full (database: {exc}, {code}); "
            f"{outcome}"
        )
    if code.startswith(_SQLITE_UNWRITABLE):
        return StorageUnavailable(
            f"cannot {action}: the server's database cannot be written ({exc}, {code}); {outcome}"
        )
    return None
