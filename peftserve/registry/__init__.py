"""Adapter registry: content-addressed adapter files under the data directory, metadata in SQLite."""

from peftserve.registry.db import connect, transaction
from peftserve.registry.digest import base_fingerprint, content_sha256
from peftserve.registry.errors import (
    Conflict,
    InvalidAdapter,
    InvalidName,
    NotFound,
    RegistryError,
    StorageFull,
    StorageUnavailable,
    TooLarge,
    WrongBaseModel,
    storage_errors,
)
from peftserve.registry.names import validate_name
from peftserve.registry.store import AdapterRecord, Added, Registry

__all__ = [
    "AdapterRecord",
    "Added",
    "Conflict",
    "InvalidAdapter",
    "InvalidName",
    "NotFound",
    "Registry",
    "RegistryError",
    "StorageFull",
    "StorageUnavailable",
    "TooLarge",
    "WrongBaseModel",
    "base_fingerprint",
    "connect",
    "content_sha256",
    "storage_errors",
    "transaction",
    "validate_name",
]
