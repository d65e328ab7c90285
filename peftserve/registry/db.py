"""The SQLite database under the data directory: connection settings and schema migrations.

One file, ``<data_dir>/peftserve.db``, holds the adapter registry and (in later issues)
rollout state. ``connect`` opens it in WAL mode with ``synchronous=FULL`` (a committed
transaction survives power loss) and brings the schema up to date.

Migrating: the schema version is ``PRAGMA user_version``; ``MIGRATIONS[i]`` takes the
database from version ``i`` to ``i + 1``. To change the schema, append a script to
``MIGRATIONS`` (never edit a released one); ``connect`` applies the missing ones in one
transaction.

Fencing (the Ray composition, where exactly one rollout controller may write): a controller
takes the data directory's lease with ``acquire_lease``, which raises the stored epoch by one
and makes every later write transaction of this process on that database check, inside the
transaction, that the epoch is still its own (compare-and-set). A controller that was replaced
by a newer one then fails each write with ``Fenced`` and changes nothing. Processes that never
take the lease (``peftserve serve`` in one process) write as before.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
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

LEASE_SCHEMA = """
    CREATE TABLE IF NOT EXISTS controller_lease (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        epoch       INTEGER NOT NULL,
        holder      TEXT    NOT NULL,
        acquired_at REAL    NOT NULL  -- unix seconds
    )
"""
"""The lease of the one rollout controller (created by ``acquire_lease``, outside the migrations:
a database no controller ever leased has no such table)."""

_fences: dict[str, int] = {}
"""Database file -> the lease epoch this process holds on it."""
_fences_lock = threading.Lock()


class Fenced(RuntimeError):
    """Another controller took the data directory's lease: this process may not write any more."""


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
    with transaction(conn, fenced=False):
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
def transaction(conn: sqlite3.Connection, *, fenced: bool = True) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` if the block or the commit raises.

    In a process holding the lease, it first checks the epoch (``Fenced`` if it was taken
    over); ``fenced=False`` skips the check (schema migrations, taking the lease).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        if fenced and _fences:
            _check_fence(conn)
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a failed COMMIT (disk full) may leave it open
            conn.execute("ROLLBACK")
        raise


def _database_file(conn: sqlite3.Connection) -> str:
    row = conn.execute("PRAGMA database_list").fetchone()
    return str(Path(row[2]).resolve()) if row is not None and row[2] else ""


def _check_fence(conn: sqlite3.Connection) -> None:
    with _fences_lock:
        epoch = _fences.get(_database_file(conn))
    if epoch is None:
        return
    row = conn.execute("SELECT epoch, holder FROM controller_lease WHERE id = 1").fetchone()
    if row is None or row[0] != epoch:
        holder = f"epoch {row[0]} ({row[1]})" if row is not None else "nobody"
        raise Fenced(
            f"this controller held lease epoch {epoch}, but the data directory is now leased to "
            f"{holder}: a newer controller replaced this one, which writes nothing more"
        )


def acquire_lease(data_dir: str | Path, holder: str) -> int:
    """Take the data directory's controller lease (epoch + 1) and fence this process's writes on it.

    Returns the new epoch. The previous holder, if it still runs, fails every later write.
    """
    conn = connect(data_dir)
    try:
        path = _database_file(conn)
        with transaction(conn, fenced=False):
            conn.execute(LEASE_SCHEMA)
            row = conn.execute("SELECT epoch FROM controller_lease WHERE id = 1").fetchone()
            epoch = (row[0] if row is not None else 0) + 1
            conn.execute(
                "INSERT INTO controller_lease (id, epoch, holder, acquired_at) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch, holder = excluded.holder, "
                "acquired_at = excluded.acquired_at",
                (epoch, holder, time.time()),
            )
    finally:
        conn.close()
    with _fences_lock:
        _fences[path] = epoch
    logger.info("controller lease of %s: epoch %d (%s)", data_dir, epoch, holder)
    return epoch


def lease_epoch(data_dir: str | Path) -> int | None:
    """The stored lease epoch of ``data_dir`` (None if no controller ever took it)."""
    conn = connect(data_dir)
    try:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'controller_lease'"
        ).fetchone()
        if exists is None:
            return None
        row = conn.execute("SELECT epoch FROM controller_lease WHERE id = 1").fetchone()
        return row[0] if row is not None else None
    finally:
        conn.close()


def release_fence(data_dir: str | Path) -> None:
    """Stop fencing this process's writes on ``data_dir`` (its controller stopped)."""
    with _fences_lock:
        _fences.pop(str(db_path(data_dir).resolve()), None)


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
