"""Registry errors, each with the HTTP status the admin API answers with.

The registry knows nothing of HTTP; ``status`` and ``kind`` let the API layer map any
``RegistryError`` onto a response with one handler (``APIError(err.status, str(err), code=err.kind)``).
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every error the registry raises on purpose; the message is meant for the user."""

    status: int = 500
    """HTTP status the admin API should answer with."""
    kind: str = "registry_error"
    """Short machine-readable code (the OpenAI-shaped error's ``code``)."""


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
