"""Adapter registry: content-addressed adapter files under the data directory, metadata in SQLite."""

from peftserve.registry.db import connect, transaction
from peftserve.registry.digest import base_fingerprint, content_sha256
from peftserve.registry.errors import (
    Conflict,
    InvalidAdapter,
    InvalidName,
    NotFound,
    RegistryError,
    TooLarge,
    WrongBaseModel,
)
from peftserve.registry.names import validate_name
from peftserve.registry.store import AdapterRecord, Registry

__all__ = [
    "AdapterRecord",
    "Conflict",
    "InvalidAdapter",
    "InvalidName",
    "NotFound",
    "Registry",
    "RegistryError",
    "TooLarge",
    "WrongBaseModel",
    "base_fingerprint",
    "connect",
    "content_sha256",
    "transaction",
    "validate_name",
]
