"""The adapter registry: content-addressed files on disk, metadata in SQLite.

Layout under the data directory::

    peftserve.db              metadata (``peftserve.registry.db``), WAL mode
    registry.lock             flock: shared while a Registry is open, exclusive for start-up cleanup
    blobs/<sha256>/           adapter_config.json, adapter_model.safetensors
    tmp/upload-*/             uploads in progress

Adding writes the files into a fresh ``tmp/`` directory (each one fsync'd), hashes and
validates them there and fsyncs the directory. Then, in one database transaction, it
inserts the row (the ``UNIQUE (task, version)`` constraint decides between concurrent
adds: the loser compares its sha256 with the stored one), renames the directory to
``blobs/<sha256>`` (then fsyncs ``blobs/``) and commits. A crash at any point leaves at
most a ``tmp/`` directory or a blob no row references; opening the registry removes both,
so after a restart it holds exactly the adapters whose row was committed.

Deleting is the mirror image, also in one transaction: delete the row, move the blob
(when no other row shares it) into ``tmp/delete-*/`` in one rename, commit, then remove
it. If the move or the commit fails, the transaction is rolled back and the blob put back,
so a delete either happens entirely or not at all; opening the registry puts back the blob
of a delete a crash interrupted before its commit.

Storage failures (read-only or full data directory) are raised as ``StorageUnavailable``
(503) or ``StorageFull`` (507), naming the cause, with nothing changed.

Nothing a user sends becomes a path: task names and versions are validated identifiers
kept in the database, stream file names must be one of the two stored names, and blob
directories are named by sha256 only.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from peftserve.lora.peft_adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError, LoRAAdapter
from peftserve.registry import db
from peftserve.registry.digest import content_sha256
from peftserve.registry.errors import (
    Conflict,
    InvalidAdapter,
    NotFound,
    TooLarge,
    WrongBaseModel,
    storage_errors,
)
from peftserve.registry.names import validate_name

logger = logging.getLogger(__name__)

STORED_FILES = (CONFIG_NAME, WEIGHTS_NAME)
"""The only files an adapter is stored with."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight files that are refused: unpickling them can run arbitrary code."""
CHUNK_BYTES = 1 << 20

Validator = Callable[[Path], LoRAAdapter]
"""The engine's ``load_adapter`` bound to its base model: raises AdapterError if unusable."""
StreamSource = bytes | BinaryIO | Iterable[bytes]
"""One uploaded file: its bytes, a binary file object, or an iterator of byte chunks."""



@dataclass(frozen=True, slots=True)
class AdapterRecord:
    """One registered adapter version (a row of the ``adapters`` table)."""

    task: str
    version: str
    sha256: str
    """Content address: see ``peftserve.registry.digest.content_sha256``."""
    rank: int
    """Largest LoRA rank over the adapter's modules."""
    alpha: float
    """``lora_alpha`` from adapter_config.json."""
    target_modules: tuple[str, ...]
    """Projection names carrying LoRA weights (e.g. ``("q_proj", "v_proj")``)."""
    size_bytes: int
    """Total size of the stored files."""
    base_fingerprint: str
    """Fingerprint of the base model it was validated against (``digest.base_fingerprint``)."""
    created_at: float
    """Unix time the version was registered."""

    @property
    def ref(self) -> str:
        """``task@version``."""
        return f"{self.task}@{self.version}"

    def to_dict(self) -> dict:
        """JSON-ready fields (for the admin API)."""
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> AdapterRecord:
        """Build a record from a row selected with the registry's columns."""
        return cls(
            task=row["task"],
            version=row["version"],
            sha256=row["sha256"],
            rank=row["rank"],
            alpha=row["alpha"],
            target_modules=tuple(json.loads(row["target_modules"])),
            size_bytes=row["size_bytes"],
            base_fingerprint=row["base_fingerprint"],
            created_at=row["created_at"],
        )


class Added(NamedTuple):
    """What an add returns: the record, and whether this call created it."""

    record: AdapterRecord
    created: bool
    """False when ``task@version`` was already registered with the same content."""


_COLUMNS = (
    "task, version, sha256, rank, alpha, target_modules, size_bytes, base_fingerprint, created_at"
)
_Stager = Callable[[Path], tuple[dict[str, str], int]]


class Registry:
    """Adapter versions of every task, stored under ``data_dir`` for one base model.

    Thread-safe: database access and publishing are serialised by a lock; hashing and
    validation of uploads run outside it, so slow uploads do not block readers.
    """

    def __init__(self, data_dir: str | Path, base_fingerprint: str) -> None:
        """Open (creating) the registry and remove what interrupted uploads left behind.

        ``base_fingerprint`` (``digest.base_fingerprint(model.config)``) is recorded with
        every adapter added and compared with fingerprints that uploads declare.
        """
        self.data_dir = Path(data_dir)
        self.base_fingerprint = base_fingerprint
        self._blobs = self.data_dir / "blobs"
        self._tmp = self.data_dir / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._lock_fd = os.open(self.data_dir / "registry.lock", os.O_RDWR | os.O_CREAT, 0o644)
        conn = None
        try:
            exclusive = _try_flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._conn = conn = db.connect(self.data_dir)
            if exclusive:
                self._remove_leftovers()
            else:
                logger.info("registry %s is open elsewhere; leaving its tmp/ alone", self.data_dir)
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        except BaseException:
            if conn is not None:
                conn.close()
            os.close(self._lock_fd)
            raise
        self._warn_other_bases()

    def close(self) -> None:
        """Close the database and release the data directory."""
        with self._lock:
            if self._lock_fd < 0:
                return
            self._conn.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- adding -------------------------------------------------------------------------

    def add_from_dir(
        self,
        task: str,
        version: str | None,
        src_dir: str | Path,
        validate: Validator,
        base_fingerprint: str | None = None,
        *,
        new_task_only: bool = False,
    ) -> Added:
        """Copy the adapter in ``src_dir`` into the store as ``task@version``.

        Only adapter_config.json and adapter_model.safetensors are copied (other files such
        as README.md are ignored); a directory holding pickle weights is refused. ``validate``
        is called on the copy before it is accepted. Same task, version and content again
        returns the existing record with ``created`` False, however many adds race (exactly
        one of them creates it). ``base_fingerprint``, when given, must equal the
        registry's. Without a ``version``, content ``task`` already has returns that version,
        and new content becomes version ``sha256[:12]``; with ``new_task_only`` new content
        is refused (Conflict) when ``task`` has a version already. Raises InvalidName,
        InvalidAdapter, WrongBaseModel, Conflict, StorageUnavailable or StorageFull.
        """
        src = Path(src_dir)
        return self._add(
            task, version, lambda staging: _stage_dir(src, staging), validate, str(src),
            base_fingerprint, new_task_only=new_task_only,
        )  # fmt: skip

    def add_from_stream(
        self,
        task: str,
        version: str,
        files: Mapping[str, StreamSource],
        max_bytes: int,
        validate: Validator,
        base_fingerprint: str | None = None,
    ) -> Added:
        """Store an uploaded adapter: ``files`` maps a stored file name to its content.

        The names must be adapter_config.json and adapter_model.safetensors (anything else,
        pickles included, is refused before a byte is written). Reading stops as soon as the
        files together pass ``max_bytes`` (TooLarge, nothing kept). Otherwise as
        ``add_from_dir``. Blocking: call it from a worker thread in async code.
        """
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        _check_stream_names(files)
        return self._add(
            task, version, lambda staging: _stage_stream(files, staging, max_bytes), validate,
            "the upload", base_fingerprint,
        )  # fmt: skip

    def register_startup(self, name: str, path: str | Path, validate: Validator) -> AdapterRecord:
        """Register ``--adapter NAME=PATH`` at start-up; return the record to serve.

        If ``name`` already has a version with this content, that record is returned (so a
        restart with the same files changes nothing); otherwise the content is added as
        version ``sha256[:12]``.
        """
        src = Path(path)
        added = self._add(
            name, None, lambda staging: _stage_dir(src, staging), validate, str(src), None
        )
        return added.record

    def _add(
        self,
        task: str,
        version: str | None,
        stage: _Stager,
        validate: Validator,
        label: str,
        declared_base: str | None,
        *,
        new_task_only: bool = False,
    ) -> Added:
        validate_name(task, "task name")
        if version is not None:
            validate_name(version, "version")
        if declared_base is not None and declared_base != self.base_fingerprint:
            raise WrongBaseModel(
                f"the adapter declares base model fingerprint {declared_base[:12]}..., but this "
                f"server's base model is {self.base_fingerprint[:12]}..."
            )
        with storage_errors("store the adapter", "nothing was stored"):
            staging = Path(tempfile.mkdtemp(prefix="upload-", dir=self._tmp))
        try:
            with storage_errors("store the adapter", "nothing was stored"):
                hashes, size = stage(staging)
            sha = content_sha256(hashes)
            if version is None:
                same = self._find_content(task, sha)
                if same is not None:
                    logger.info("adapter %s from %s is already registered", same.ref, label)
                    return Added(same, False)
                if new_task_only and self._query("SELECT 1 FROM adapters WHERE task = ? LIMIT 1", task):
                    raise Conflict(f"task {task!r} is registered already, with other content")
                version = sha[:12]
            existing = self._find(task, version)
            if existing is not None:  # answered before validating; _publish decides races
                return Added(_same_or_conflict(existing, sha), False)
            adapter = _run_validator(validate, staging, label)
            with storage_errors("store the adapter", "nothing was stored"):
                _fsync_dir(staging)
                return self._publish(staging, task, version, sha, size, adapter)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _publish(
        self, staging: Path, task: str, version: str, sha: str, size: int, adapter: LoRAAdapter
    ) -> Added:
        """Insert the row and move the files into ``blobs/`` in one transaction."""
        record = AdapterRecord(
            task=task,
            version=version,
            sha256=sha,
            rank=adapter.rank,
            alpha=adapter.alpha,
            target_modules=tuple(adapter.target_modules),
            size_bytes=size,
            base_fingerprint=self.base_fingerprint,
            created_at=time.time(),
        )
        blob = self._blobs / sha
        moved = False
        with self._lock:
            try:
                with db.transaction(self._conn):
                    inserted = self._conn.execute(
                        f"INSERT INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT (task, version) DO NOTHING",
                        (record.task, record.version, record.sha256, record.rank, record.alpha,
                         json.dumps(list(record.target_modules)), record.size_bytes,
                         record.base_fingerprint, record.created_at),
                    ).rowcount  # fmt: skip
                    if not inserted:  # another add of task@version committed first
                        return Added(_same_or_conflict(self.get(task, version), sha), False)
                    if not blob.exists():  # else: the same content is stored for another version
                        os.rename(staging, blob)
                        moved = True
                        _fsync_dir(self._blobs)
            except BaseException:
                if moved and not self._referenced(sha):
                    self._discard(blob)
                raise
        logger.info(
            "registered adapter %s (sha256 %s, rank %d, %d bytes)", record.ref, sha[:12], record.rank, size
        )
        return Added(record, True)

    # ---- reading ------------------------------------------------------------------------

    def list(self, task: str | None = None) -> builtins.list[AdapterRecord]:
        """Every adapter version (of ``task`` if given), by task, oldest version first."""
        if task is None:
            rows = self._query(f"SELECT {_COLUMNS} FROM adapters ORDER BY task, id")
        else:
            validate_name(task, "task name")
            rows = self._query(f"SELECT {_COLUMNS} FROM adapters WHERE task = ? ORDER BY id", task)
        return [AdapterRecord.from_row(row) for row in rows]

    def tasks(self) -> builtins.list[str]:
        """Names of the tasks that have at least one version, sorted."""
        return [row[0] for row in self._query("SELECT DISTINCT task FROM adapters ORDER BY task")]

    def get(self, task: str, version: str) -> AdapterRecord:
        """The record of ``task@version``; NotFound if there is none."""
        validate_name(task, "task name")
        validate_name(version, "version")
        record = self._find(task, version)
        if record is None:
            raise NotFound(f"adapter {task}@{version} is not registered")
        return record

    def latest(self, task: str) -> AdapterRecord:
        """The most recently registered version of ``task``; NotFound if it has none."""
        validate_name(task, "task name")
        rows = self._query(
            f"SELECT {_COLUMNS} FROM adapters WHERE task = ? ORDER BY id DESC LIMIT 1", task
        )
        if not rows:
            raise NotFound(f"task {task!r} has no registered adapter")
        return AdapterRecord.from_row(rows[0])

    def path_of(self, record: AdapterRecord) -> Path:
        """Directory holding the record's files (pass it to the engine's load_adapter)."""
        path = self._blobs / record.sha256
        if len(record.sha256) != 64 or not path.is_dir():
            raise NotFound(f"files of adapter {record.ref} ({record.sha256[:12]}) are missing")
        return path

    def files_of(self, sha256: str) -> dict[str, Path]:
        """The stored files of the adapter content ``sha256`` (engine replicas fetch adapters by
        it); NotFound unless a registered version has that content."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise NotFound(f"{sha256[:80]!r} is not an adapter's sha256")
        if not self._query("SELECT 1 FROM adapters WHERE sha256 = ? LIMIT 1", sha256):
            raise NotFound(f"no registered adapter has the content {sha256[:12]}")
        blob = self._blobs / sha256
        files = {name: blob / name for name in STORED_FILES if (blob / name).is_file()}
        if CONFIG_NAME not in files:
            raise NotFound(f"the files of adapter content {sha256[:12]} are missing")
        return files

    # ---- deleting -----------------------------------------------------------------------

    def delete(
        self, task: str, version: str, is_protected: Callable[[str, str], bool]
    ) -> AdapterRecord:
        """Remove ``task@version``; return its record.

        Refused with Conflict while ``is_protected(task, version)`` is true (the rollout
        layer protects the stable and candidate versions of active rollouts). The files go
        only when no other record has the same content. All or nothing: when the data
        directory cannot be written, StorageUnavailable or StorageFull is raised and the
        row and its files stay as they were.
        """
        with self._lock:
            record = self.get(task, version)
            if is_protected(task, version):
                raise Conflict(f"adapter {record.ref} is in use by an active rollout; end it first")
            blob, trash = self._blobs / record.sha256, None
            with storage_errors(f"delete adapter {record.ref}", "nothing was deleted"):
                try:
                    with db.transaction(self._conn):
                        self._conn.execute(
                            "DELETE FROM adapters WHERE task = ? AND version = ?", (task, version)
                        )
                        if not self._referenced(record.sha256) and blob.exists():
                            trash = Path(tempfile.mkdtemp(prefix="delete-", dir=self._tmp))
                            os.rename(blob, trash / blob.name)
                            _fsync_dir(self._blobs)
                except BaseException:
                    if trash is not None:
                        self._put_back(trash / blob.name, blob)
                        with contextlib.suppress(OSError):
                            trash.rmdir()  # only once empty: else the next start puts it back
                    raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)  # what is left is removed at the next start
        logger.info("deleted adapter %s", record.ref)
        return record

    # ---- internals ----------------------------------------------------------------------

    def _query(self, sql: str, *params: object) -> builtins.list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _find(self, task: str, version: str) -> AdapterRecord | None:
        rows = self._query(
            f"SELECT {_COLUMNS} FROM adapters WHERE task = ? AND version = ?", task, version
        )
        return AdapterRecord.from_row(rows[0]) if rows else None

    def _find_content(self, task: str, sha: str) -> AdapterRecord | None:
        rows = self._query(
            f"SELECT {_COLUMNS} FROM adapters WHERE task = ? AND sha256 = ? ORDER BY id DESC LIMIT 1",
            task, sha,
        )  # fmt: skip
        return AdapterRecord.from_row(rows[0]) if rows else None

    def _referenced(self, sha: str) -> bool:
        return bool(self._query("SELECT 1 FROM adapters WHERE sha256 = ? LIMIT 1", sha))

    def _discard(self, blob: Path) -> None:
        """Remove a blob no row references (an add that did not commit); errors are logged, and
        the start-up sweep removes what is left."""
        try:
            if blob.exists():
                trash = Path(tempfile.mkdtemp(prefix="discard-", dir=self._tmp))
                os.rename(blob, trash / blob.name)
                shutil.rmtree(trash, ignore_errors=True)
        except OSError:
            logger.exception("cannot remove the uncommitted blob %s; the next start will", blob)

    def _put_back(self, moved: Path, blob: Path) -> None:
        """Undo a delete's move of ``blob`` to ``moved`` (the start-up sweep does it otherwise)."""
        if not moved.exists() or blob.exists():
            return
        try:
            os.rename(moved, blob)
            _fsync_dir(self._blobs)
        except OSError:
            logger.exception("cannot put %s back to %s; the next start will", moved, blob)

    def _remove_leftovers(self) -> None:
        """Remove interrupted uploads (tmp/) and blobs no row references; put back the files of
        deletes that did not commit. Called exclusively."""
        known = {row[0] for row in self._query("SELECT DISTINCT sha256 FROM adapters")}
        for entry in self._tmp.iterdir():
            if entry.name.startswith("delete-") and entry.is_dir() and not entry.is_symlink():
                for moved in entry.iterdir():
                    if moved.name in known and not (self._blobs / moved.name).exists():
                        logger.warning("putting back %s: its delete did not commit", moved.name)
                        os.rename(moved, self._blobs / moved.name)
            logger.warning("removing leftover of an interrupted upload or delete: %s", entry)
            _remove(entry)
        for entry in self._blobs.iterdir():
            if entry.name not in known:
                logger.warning("removing unregistered blob %s (its upload never committed)", entry)
                _remove(entry)
        for sha in sorted(known - {entry.name for entry in self._blobs.iterdir()}):
            logger.error("files of adapter content %s are missing from %s", sha[:12], self._blobs)
        _fsync_dir(self._tmp)
        _fsync_dir(self._blobs)

    def _warn_other_bases(self) -> None:
        rows = self._query(
            "SELECT COUNT(*) FROM adapters WHERE base_fingerprint != ?", self.base_fingerprint
        )
        if rows[0][0]:
            logger.warning(
                "%d registered adapter(s) in %s were made for another base model",
                rows[0][0], self.data_dir,
            )  # fmt: skip


def _same_or_conflict(existing: AdapterRecord, sha: str) -> AdapterRecord:
    if existing.sha256 != sha:
        raise Conflict(
            f"adapter {existing.ref} already exists with different content "
            f"(sha256 {existing.sha256[:12]}..., upload {sha[:12]}...); register a new version"
        )
    logger.info("adapter %s is already registered with this content", existing.ref)
    return existing


def _run_validator(validate: Validator, staging: Path, label: str) -> LoRAAdapter:
    try:
        return validate(staging)
    except AdapterError as exc:
        message = str(exc).replace(str(staging), label)
        error = (WrongBaseModel if "another base model" in message else InvalidAdapter)(message)
        if exc.field is not None:
            error.param = f"{CONFIG_NAME}.{exc.field}"
        raise error from None


def _pickle_refusal(names: Iterable[str]) -> InvalidAdapter:
    listed = ", ".join(sorted(str(name)[:80] for name in names))
    return InvalidAdapter(
        f"pickle files are refused ({listed}): unpickling can run code; save the adapter with "
        "safetensors (save_pretrained(..., safe_serialization=True)) and provide only "
        f"{CONFIG_NAME} and {WEIGHTS_NAME}"
    )


def _check_stream_names(files: Mapping[str, StreamSource]) -> None:
    for name in files:
        if name in STORED_FILES:
            continue
        if str(name).lower().endswith(PICKLE_SUFFIXES):
            raise _pickle_refusal([name])
        raise InvalidAdapter(
            f"unexpected file {str(name)[:80]!r}: an adapter upload holds only "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}"
        )


def _stage_dir(src: Path, staging: Path) -> tuple[dict[str, str], int]:
    if not src.is_dir():
        raise InvalidAdapter(f"adapter directory {src} does not exist")
    pickles = [entry.name for entry in src.iterdir() if entry.name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise _pickle_refusal(pickles)
    hashes, total = {}, 0
    for name in STORED_FILES:
        if (src / name).is_file():
            with open(src / name, "rb") as f:
                hashes[name], size = _write_file(staging / name, _chunks(f), None)
            total += size
    return hashes, total


def _stage_stream(
    files: Mapping[str, StreamSource], staging: Path, max_bytes: int
) -> tuple[dict[str, str], int]:
    hashes, total = {}, 0
    for name in STORED_FILES:
        if name in files:
            hashes[name], size = _write_file(staging / name, _chunks(files[name]), max_bytes - total)
            total += size
    return hashes, total


def _write_file(dest: Path, chunks: Iterator[bytes], limit: int | None) -> tuple[str, int]:
    """Write ``chunks`` to a new file and fsync it; return its sha256 and size."""
    digest, size = hashlib.sha256(), 0
    with open(dest, "xb") as f:
        for chunk in chunks:
            size += len(chunk)
            if limit is not None and size > limit:
                raise TooLarge("the upload is larger than the limit of the server")
            digest.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest(), size


def _chunks(source: StreamSource) -> Iterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield bytes(source)
        return
    read = getattr(source, "read", None)
    chunks: Iterable[object] = iter(lambda: read(CHUNK_BYTES), b"") if read else source
    for chunk in chunks:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"upload streams must give bytes, not {type(chunk).__name__}")
        if chunk:
            yield bytes(chunk)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        return False
    return True
