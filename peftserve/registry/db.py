"""The SQLite database under the data directory: connection settings and schema migrations.

One file, ``<data_dir>/peftserve.db``, holds the adapter registry and (in later issues)
rollout state. ``connect`` opens it in WAL mode with ``synchronous=FULL`` (a committed
transaction survives power loss) and brings the schema up to date.

Migrating: the schema version is ``PRAGMA user_version``; ``MIGRATIONS[i]`` takes the
database from version ``i`` to ``i + 1``. To change the schema, append a script to
``MIGRATIONS`` (never edit a released one); ``connect`` applies the missing ones in one
transaction.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

DB_NAME = "peftserve.db"
"""File name of the database inside the data directory."""

MIGRATIONS: tuple[str, ...] = (
    # 1: the adapter registry.
    """
    CREATE TABLE adapters (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        task             TEXT    NOT NULL,
        version          TEXT    NOT NULL,
        sha256           TEXT    NOT NULL,
        rank             INTEGER NOT NULL,
        alpha            REAL    NOT NULL,
        target_modules   TEXT    NOT NULL,  -- JSON list of projection names
        size_bytes       INTEGER NOT NULL,
        base_fingerprint TEXT    NOT NULL,
        created_at       REAL    NOT NULL,  -- unix seconds
        UNIQUE (task, version)
    );
    CREATE INDEX adapters_sha256 ON adapters (sha256);
    """,
    # 2: the stable version of each task (the one its unpinned requests go to).
    """
    CREATE TABLE task_stable (
        task    TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        FOREIGN KEY (task, version) REFERENCES adapters (task, version)
    );
    """,
)
"""Schema scripts in order; the database's ``user_version`` counts those applied."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The schema version this code writes."""


def db_path(data_dir: str | Path) -> Path:
    """Path of the database file for ``data_dir``."""
    return Path(data_dir) / DB_NAME


def connect(data_dir: str | Path, timeout_s: float = 10.0) -> sqlite3.Connection:
    """Open (creating if needed) the data directory's database, migrated to SCHEMA_VERSION.

    The connection is in autocommit mode (``isolation_level=None``): group writes with
    ``transaction(conn)``. It may be used from any thread (``check_same_thread=False``), but
    not from two at once: guard it with a lock, or open one connection per thread.
    """
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        db_path(data_dir), timeout=timeout_s, isolation_level=None, check_same_thread=False
    )
    try:
        conn.row_factory = sqlite3.Row
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"cannot put {db_path(data_dir)} in WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the database lacks; return the schema version it is now at."""
    with transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {version} is newer than this peftserve's "
                f"({SCHEMA_VERSION}); upgrade peftserve or use another --data-dir"
            )
        for number in range(version, SCHEMA_VERSION):
            logger.info("migrating database schema %d -> %d", number, number + 1)
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
        # PRAGMA does not take parameters; SCHEMA_VERSION is an int we own.
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION:d}")
    return SCHEMA_VERSION


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` if the block or the commit raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a failed COMMIT (disk full) may leave it open
            conn.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (executescript would commit our transaction)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement in migration: {current.strip()[:80]!r}")
    return statements
