"""Rollout persistence: the rollouts and their audit log, in the registry's SQLite database.

Two tables beside the registry's, in ``<data_dir>/peftserve.db`` (opened with
:func:`peftserve.registry.db.connect`: WAL, ``synchronous=FULL``), created by
:func:`ensure_schema`:

* ``canary_rollouts``: one row per rollout: its spec (JSON), where it stands (state, step,
  weight, times) and its eval set (JSON). A partial unique index allows one rollout per task in
  an active state, so even two processes cannot start two.
* ``canary_events``: the append-only history (triggers refuse UPDATE and DELETE): state changes
  (``from``, ``to``, ``weight``, ``reason``, ``actor`` controller or admin), judgments
  (``Judgment.to_dict()``: per metric the samples per arm, estimate, interval,
  classification; score, result, reason), decisions (action and reason in words), evaluator
  errors and unloads.

Each write is one transaction, and a transition's new state is written in the same transaction
as the events that explain it (:meth:`RolloutStore.update` takes them), so a process killed at
any moment leaves every rollout in a state its history accounts for.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftserve.canary.judge import Judgment
from peftserve.canary.spec import ACTIVE_STATES, Rollout, RolloutConflictError, RolloutSpec
from peftserve.registry import db

logger = logging.getLogger(__name__)

_ACTIVE_SQL = "(" + ", ".join(f"'{s}'" for s in sorted(ACTIVE_STATES)) + ")"

SCHEMA: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS canary_rollouts (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        task            TEXT    NOT NULL,
        stable          TEXT    NOT NULL,
        candidate       TEXT    NOT NULL,
        spec            TEXT    NOT NULL,  -- RolloutSpec.to_dict() as JSON
        state           TEXT    NOT NULL,
        step_index      INTEGER NOT NULL,
        weight          REAL    NOT NULL,  -- derived from the step; kept for people reading the table
        step_started_at REAL    NOT NULL,  -- unix seconds
        started_at      REAL    NOT NULL,
        updated_at      REAL    NOT NULL,
        eval_set        TEXT,              -- JSON list of {"prompt", "answer"} or NULL
        retry_of        INTEGER REFERENCES canary_rollouts (id)
    )
    """,
    "CREATE INDEX IF NOT EXISTS canary_rollouts_task ON canary_rollouts (task, id)",
    f"""
    CREATE UNIQUE INDEX IF NOT EXISTS canary_rollouts_one_active
        ON canary_rollouts (task) WHERE state IN {_ACTIVE_SQL}
    """,
    """
    CREATE TABLE IF NOT EXISTS canary_events (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        rollout_id INTEGER NOT NULL REFERENCES canary_rollouts (id),
        task       TEXT    NOT NULL,
        at         REAL    NOT NULL,  -- unix seconds
        kind       TEXT    NOT NULL,  -- state, judgment, decision, evaluator_error, unload, ...
        actor      TEXT,              -- controller or admin (state changes and decisions)
        reason     TEXT,              -- in words
        payload    TEXT    NOT NULL   -- JSON
    )
    """,
    "CREATE INDEX IF NOT EXISTS canary_events_rollout ON canary_events (rollout_id, kind, id)",
    "CREATE INDEX IF NOT EXISTS canary_events_task ON canary_events (task, id)",
    """
    CREATE TRIGGER IF NOT EXISTS canary_events_no_update BEFORE UPDATE ON canary_events
    BEGIN SELECT RAISE(ABORT, 'canary_events is append-only'); END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS canary_events_no_delete BEFORE DELETE ON canary_events
    BEGIN SELECT RAISE(ABORT, 'canary_events is append-only'); END
    """,
)
"""Statements of :func:`ensure_schema`, each idempotent."""


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the rollout tables, indexes and triggers if they are missing (one transaction)."""
    with db.transaction(conn):
        for statement in SCHEMA:
            conn.execute(statement)


@dataclass(frozen=True)
class Event:
    """One history entry to write: ``kind`` and its JSON ``payload`` at time ``at``.

    The payload's ``reason`` and ``actor``, when present, are also stored in their own columns.
    """

    kind: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    at: float | None = None
    """Unix seconds; None: the time of writing."""


def _json_default(value: Any) -> Any:
    """numpy scalars and tuples in payloads (``item()`` gives the Python number)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, separators=(",", ":"))


class RolloutStore:
    """Rollouts and their history in ``<data_dir>/peftserve.db``. Thread-safe (one connection, a lock).

    ``clock`` stamps events written without a time of their own.
    """

    def __init__(self, data_dir: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self._conn = db.connect(data_dir)
        self._clock = clock
        self._lock = threading.Lock()
        try:
            ensure_schema(self._conn)
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RolloutStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes -------------------------------------------------------------------------

    def create(
        self,
        rollout: Rollout,
        eval_set: Sequence[Mapping[str, Any]] | None = None,
        events: Sequence[Event] = (),
        *,
        retry_of: int | None = None,
    ) -> int:
        """Insert a new rollout (and its first ``events``) in one transaction; returns its id.

        Raises :class:`RolloutConflictError` when the task already has an active rollout.
        """
        r, spec = rollout, rollout.spec
        with self._lock:
            try:
                with db.transaction(self._conn):
                    cur = self._conn.execute(
                        "INSERT INTO canary_rollouts (task, stable, candidate, spec, state, step_index, weight,"
                        " step_started_at, started_at, updated_at, eval_set, retry_of)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (spec.task, spec.stable, spec.candidate, _dumps(spec.to_dict()), r.state, r.step_index,
                         r.weight, r.step_started_at, r.started_at, r.updated_at,
                         _dumps(list(eval_set)) if eval_set is not None else None, retry_of),
                    )
                    rollout_id = int(cur.lastrowid)
                    self._insert_events(rollout_id, spec.task, events)
            except sqlite3.IntegrityError as e:
                if "UNIQUE" in str(e):
                    raise RolloutConflictError(f"task {spec.task!r} already has an active rollout") from e
                raise
        return rollout_id

    def update(self, rollout_id: int, rollout: Rollout, events: Sequence[Event] = ()) -> None:
        """Write the rollout's new state together with the ``events`` that explain it (one transaction)."""
        r = rollout
        with self._lock, db.transaction(self._conn):
            row = self._conn.execute("SELECT task FROM canary_rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if row is None:
                raise KeyError(f"no rollout with id {rollout_id}")
            if row["task"] != r.spec.task:
                raise ValueError(f"rollout {rollout_id} is of task {row['task']!r}, not {r.spec.task!r}")
            self._conn.execute(
                "UPDATE canary_rollouts SET spec = ?, state = ?, step_index = ?, weight = ?,"
                " step_started_at = ?, started_at = ?, updated_at = ? WHERE id = ?",
                (_dumps(r.spec.to_dict()), r.state, r.step_index, r.weight, r.step_started_at, r.started_at,
                 r.updated_at, rollout_id),
            )
            self._insert_events(rollout_id, r.spec.task, events)

    def append_event(self, rollout_id: int, kind: str, payload: Mapping[str, Any], at: float | None = None) -> int:
        """Append one history entry to the rollout's log; returns its id."""
        return self.append_events(rollout_id, [Event(kind, payload, at)])[-1]

    def append_events(self, rollout_id: int, events: Sequence[Event]) -> list[int]:
        """Append several history entries in one transaction; returns their ids."""
        with self._lock, db.transaction(self._conn):
            row = self._conn.execute("SELECT task FROM canary_rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if row is None:
                raise KeyError(f"no rollout with id {rollout_id}")
            return self._insert_events(rollout_id, row["task"], events)

    def _insert_events(self, rollout_id: int, task: str, events: Sequence[Event]) -> list[int]:
        ids = []
        for e in events:
            if not isinstance(e.kind, str) or not e.kind:
                raise ValueError(f"event kind must be a non-empty string, not {e.kind!r}")
            payload = dict(e.payload)
            at = e.at if e.at is not None else self._clock()
            cur = self._conn.execute(
                "INSERT INTO canary_events (rollout_id, task, at, kind, actor, reason, payload)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rollout_id, task, at, e.kind, payload.get("actor"), payload.get("reason"), _dumps(payload)),
            )
            ids.append(int(cur.lastrowid))
        return ids

    # ---- reads --------------------------------------------------------------------------

    @staticmethod
    def _rollout(row: sqlite3.Row) -> Rollout:
        return Rollout(
            RolloutSpec.from_dict(json.loads(row["spec"])), row["state"], row["step_index"],
            row["step_started_at"], row["started_at"], row["updated_at"],
        )

    def active(self) -> list[tuple[int, Rollout]]:
        """Every rollout in an active state (shadow, ramping, paused), oldest first, with its id."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT * FROM canary_rollouts WHERE state IN {_ACTIVE_SQL} ORDER BY id"
            ).fetchall()
        return [(row["id"], self._rollout(row)) for row in rows]

    def get(self, task: str) -> tuple[int, Rollout] | None:
        """The task's latest rollout (the active one, else the last finished), with its id."""
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM canary_rollouts WHERE task = ? ORDER BY id DESC LIMIT 1", (task,)
            ).fetchone()
        return (row["id"], self._rollout(row)) if row is not None else None

    def by_id(self, rollout_id: int) -> Rollout:
        """The rollout with id ``rollout_id`` (KeyError if none)."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM canary_rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            raise KeyError(f"no rollout with id {rollout_id}")
        return self._rollout(row)

    def eval_set(self, rollout_id: int) -> list[dict[str, Any]] | None:
        """The rollout's eval set (None when it has none)."""
        with self._lock:
            row = self._conn.execute("SELECT eval_set FROM canary_rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            raise KeyError(f"no rollout with id {rollout_id}")
        return json.loads(row["eval_set"]) if row["eval_set"] is not None else None

    def history(self, task: str, limit: int = 100, *, rollout_id: int | None = None,
                kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The task's latest ``limit`` events (of one rollout, of some kinds), oldest first.

        Each is a dict: ``id``, ``rollout_id``, ``task``, ``at``, ``kind``, ``actor``, ``reason``
        and ``payload`` (the JSON written).
        """
        where, args = ["task = ?"], [task]
        if rollout_id is not None:
            where.append("rollout_id = ?")
            args.append(rollout_id)
        if kinds is not None:
            where.append(f"kind IN ({', '.join('?' * len(kinds))})")
            args.extend(kinds)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT * FROM canary_events WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
                (*args, int(limit)),
            ).fetchall()
        return [
            {"id": row["id"], "rollout_id": row["rollout_id"], "task": row["task"], "at": row["at"],
             "kind": row["kind"], "actor": row["actor"], "reason": row["reason"],
             "payload": json.loads(row["payload"])}
            for row in reversed(rows)
        ]

    def judgments(self, rollout_id: int) -> list[Judgment]:
        """Every judgment of the rollout, oldest first (what :func:`~peftserve.canary.judge.decide` reads)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT payload FROM canary_events WHERE rollout_id = ? AND kind = 'judgment' ORDER BY id",
                (rollout_id,),
            ).fetchall()
        return [Judgment.from_dict(json.loads(row["payload"])) for row in rows]
