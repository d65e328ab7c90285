"""The stable version of each task, kept in the data directory's database (table ``task_stable``).

A task's stable version serves its unpinned requests. It is set when the task gets its
first version and changes only when a rollout promotes a candidate; other versions can be
pinned (``"model": "task@version"``) but take no traffic of their own. The table references
``adapters (task, version)``, so the database itself refuses to delete a stable version.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from peftserve.registry import db, storage_errors

logger = logging.getLogger(__name__)


class StablePointers:
    """task -> stable version, persistent. Thread-safe (one connection behind a lock)."""

    def __init__(self, data_dir: str | Path) -> None:
        self._conn = db.connect(data_dir)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def all(self) -> dict[str, str]:
        """Every task's stable version."""
        with self._lock:
            rows = self._conn.execute("SELECT task, version FROM task_stable").fetchall()
        return {row["task"]: row["version"] for row in rows}

    def get(self, task: str) -> str | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT version FROM task_stable WHERE task = ?", (task,)
            ).fetchone()
        return row["version"] if row is not None else None

    def ensure(self, task: str, version: str) -> str:
        """Make ``version`` the stable version of ``task`` if it has none; return the stable one."""
        action = f"record the stable version of task {task}"
        with storage_errors(action, "nothing was changed"), self._lock, db.transaction(self._conn):
            self._conn.execute(
                "INSERT OR IGNORE INTO task_stable (task, version) VALUES (?, ?)", (task, version)
            )
            row = self._conn.execute(
                "SELECT version FROM task_stable WHERE task = ?", (task,)
            ).fetchone()
        if row["version"] == version:
            logger.info("task %s: stable version is %s", task, version)
        return row["version"]

    def set(self, task: str, version: str) -> None:
        """Point ``task`` at ``version`` (a registered version; the rollout layer promotes with it)."""
        action = f"record the stable version of task {task}"
        with storage_errors(action, "nothing was changed"), self._lock, db.transaction(self._conn):
            self._conn.execute(
                "INSERT INTO task_stable (task, version) VALUES (?, ?) "
                "ON CONFLICT (task) DO UPDATE SET version = excluded.version",
                (task, version),
            )
        logger.info("task %s: stable version is now %s", task, version)

    def remove(self, task: str) -> None:
        action = f"remove the stable version of task {task}"
        with storage_errors(action, "nothing was changed"), self._lock, db.transaction(self._conn):
            self._conn.execute("DELETE FROM task_stable WHERE task = ?", (task,))


def is_foreign_key_error(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite refusing to delete a row another table still references."""
    return isinstance(exc, sqlite3.IntegrityError) and "FOREIGN KEY" in str(exc)
