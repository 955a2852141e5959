"""Where snapshots outlive the process: a store behind one small interface.

The registry keeps every snapshot in memory and reads them there; a store
only has to remember them across a restart. Its verbs:

* :meth:`Store.load` at start: every kept record, oldest first;
* :meth:`Store.save` on a change: never waits on the disk (the record is
  queued, and a writer thread writes what is queued every ``store_flush``
  seconds, one transaction, the newest record of each resource only);
* :meth:`Store.forget` when a snapshot is evicted;
* :meth:`Store.close` at shutdown: what is queued is written.

Two kinds here: :class:`MemoryStore` keeps nothing (``store = "memory"``) and
:class:`SqliteStore` keeps a file (``store = "sqlite:PATH"``, the default);
a fleet's shared store is ``sidecar.state.fleet``'s. Which one a process
uses is the wiring's choice (``sidecar.app.open_store``).
A store that cannot be used never stops the proxy: it says so in one log
line, a corrupt file is moved aside, and the sidecar goes on in memory with
``degraded`` set (``/readyz`` and ``sidecar_store_degraded`` report it). Two
processes cannot use one file: the second is refused at start
(:class:`StoreInUse`), as is a file written by a newer schema
(:class:`StoreTooNew`), a symbolic link at the file's path, and a file made
for another upstream unless ``store_adopt`` is set (:class:`StoreRefused`).
Every row read back is checked (:mod:`sidecar.records`): a bad one is deleted
with one warning line, and that conversation is observed afresh.

The file holds ``last_error`` texts, which can carry provider messages and
paths: it and its companions (``-wal``, ``-shm``, ``.lock``) are made
``0600`` and their directory ``0700`` (an existing looser one is tightened,
or a warning says it could not be).

After a SIGKILL, at most the changes of the last ``store_flush`` interval
are lost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..core.snapshot import ACTIVE
from . import records
from .records import Rejected, Rejections

__all__ = [
    "SCHEMA_VERSION",
    "MemoryStore",
    "Record",
    "SqliteStore",
    "Store",
    "StoreInUse",
    "StoreRefused",
    "StoreTooNew",
    "default_path",
]

log = logging.getLogger("sidecar.store")

SCHEMA_VERSION = 1


class StoreInUse(RuntimeError):
    """Another process has the file open."""


class StoreTooNew(RuntimeError):
    """The file was written by a newer schema than this version knows."""


class StoreRefused(RuntimeError):
    """The store must not be used as it is (a symbolic link, another upstream's)."""


def upstream_label(upstream: str) -> str:
    """The upstream a store is made for, as it is written there: its URL
    without credentials (they must never be written to a store)."""
    from urllib.parse import urlsplit

    parts = urlsplit(upstream)
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=host).geturl().rstrip("/")


def refuse_other_upstream(where: str, made_for: str, upstream: str) -> StoreRefused:
    return StoreRefused(
        f"store: {where} was made for the upstream {made_for}, not {upstream_label(upstream)}: "
        "use another store, or set store_adopt = true (--store-adopt, SIDECAR_STORE_ADOPT) "
        "to take it over with what it holds"
    )


@dataclass
class Record:
    """What is kept of one resource."""

    resource_id: str
    #: ``Snapshot.lasting()``: every field but the stream.
    snapshot: dict[str, Any]
    transitions: list[dict[str, Any]] = field(default_factory=list)
    last_event_id: str | None = None


class Store:
    """The interface (and the memory store: it keeps nothing)."""

    kind = "memory"
    #: Why the store is not doing its job (None: it is).
    degraded: str | None = None

    def __init__(self) -> None:
        #: Records read back and rejected (sidecar_store_rejected_total).
        self.rejections = Rejections()

    def load(self) -> list[Record]:
        return []

    def save(self, record: Record) -> None:
        pass

    def forget(self, resource_id: str) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryStore(Store):
    pass


class SqliteStore(Store):
    """One SQLite file (WAL), written by a thread of its own."""

    kind = "sqlite"

    def __init__(
        self,
        path: Path,
        flush_every: float,
        retention: float,
        *,
        upstream: str = "",
        adopt: bool = False,
        limit: int = 4 * 1024 * 1024,
    ) -> None:
        super().__init__()
        self.path = path
        self.upstream = upstream
        self.adopt = adopt
        #: max_event_bytes: what one field read back may hold.
        self.limit = limit
        self.flush_every = flush_every
        self.retention = retention
        self._db: sqlite3.Connection | None = None
        self._lock_file: Any = None
        self._pending: dict[str, Record | None] = {}  # resource: newest record, None: forget
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.writes = 0  # records written, for tests and metrics

    # ---------------------------------------------------------- opening
    def open(self) -> None:
        """Lock and open the file; a file that cannot be used degrades to memory."""
        if self.path.is_symlink():
            raise StoreRefused(
                f"store: {self.path} is a symbolic link: refused (give the file's own path)"
            )
        try:
            self._private_directory()
            fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            self._lock_file = os.fdopen(fd, "a+")
            # Made before SQLite opens it, so that it is never readable by others
            # (SQLite gives -wal and -shm the database's own permissions).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            for name in (self.path, *(Path(f"{self.path}{end}") for end in ("-wal", "-shm"))):
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(name).st_mode & 0o077:
                        os.chmod(name, 0o600)
            os.chmod(str(self.path) + ".lock", 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreRefused(
                    f"store: {self.path} is a symbolic link: refused (give the file's own path)"
                ) from None
            self._degrade(f"cannot create {self.path}: {exc.strerror or exc}")
            return
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise StoreInUse(
                f"store: {self.path} is in use by another sidecar "
                "(give each its own file with --store sqlite:PATH)"
            ) from None
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            if "file is not a database" in str(exc) or "malformed" in str(exc):
                aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
                with contextlib.suppress(OSError):
                    self.path.rename(aside)
                    os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
                log.warning(
                    "store file is corrupt: moved aside, starting empty",
                    extra={"path": str(self.path), "moved_to": str(aside), "error": str(exc)},
                )
                try:
                    self._db = self._connect()
                except sqlite3.Error as again:
                    self._degrade(f"cannot use {self.path}: {again}")
                    return
            else:
                self._degrade(f"cannot use {self.path}: {exc}")
                return
        except sqlite3.Error as exc:
            self._degrade(f"cannot use {self.path}: {exc}")
            return
        self._thread = threading.Thread(target=self._write_loop, name="sidecar-store", daemon=True)
        self._thread.start()

    def _private_directory(self) -> None:
        """The directory, made 0700; an existing looser one is tightened if it
        is ours, else a warning says who can read the file."""
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o700)
            return
        mode = directory.stat().st_mode & 0o777
        if not mode & 0o077:
            return
        try:
            os.chmod(directory, 0o700)
        except OSError as exc:
            log.warning(
                "store directory is readable by others: could not make it 0700",
                extra={"directory": str(directory), "mode": oct(mode), "error": str(exc)},
            )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise StoreTooNew(
                    f"store: {self.path} was written by a newer sidecar (schema {row[0]}, "
                    f"this one knows {SCHEMA_VERSION}): use a newer sidecar or another file"
                )
            db.execute(
                "CREATE TABLE IF NOT EXISTS snapshots (id TEXT PRIMARY KEY, updated REAL,"
                " active INTEGER, record BLOB)"
            )
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
            self._check_upstream(db)
        except BaseException:
            db.close()
            raise
        return db

    def _check_upstream(self, db: sqlite3.Connection) -> None:
        """The file says which upstream it was made for; another's is refused."""
        if not self.upstream:
            return
        label = upstream_label(self.upstream)
        row = db.execute("SELECT value FROM meta WHERE key = 'upstream'").fetchone()
        if row is not None and row[0] != label:
            if not self.adopt:
                raise refuse_other_upstream(str(self.path), str(row[0]), self.upstream)
            log.warning(
                "store made for another upstream: adopted (store_adopt), its snapshots kept",
                extra={"path": str(self.path), "made_for": str(row[0]), "upstream": label},
            )
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('upstream', ?)", (label,))

    def _degrade(self, why: str) -> None:
        self.degraded = why
        log.warning("store degraded: going on in memory", extra={"reason": why})

    # ------------------------------------------------------------- verbs
    def load(self) -> list[Record]:
        if self._db is None:
            return []
        cutoff = time.time() - self.retention
        try:
            self._db.execute("DELETE FROM snapshots WHERE active = 0 AND updated < ?", (cutoff,))
            rows = self._db.execute(
                "SELECT rowid, record FROM snapshots ORDER BY updated"
            ).fetchall()
        except sqlite3.Error as exc:
            self._degrade(f"cannot read {self.path}: {exc}")
            return []
        kept, bad = [], []
        for rowid, blob in rows:
            try:
                resource_id, snap, transitions, last_event_id = records.stored_row(blob, self.limit)
            except Rejected as exc:  # one bad row costs that row only
                self.rejections.reject(f"sqlite {self.path}", exc)
                bad.append((rowid,))
                continue
            kept.append(Record(resource_id, snap.lasting(), transitions, last_event_id))
        if bad:
            with contextlib.suppress(sqlite3.Error):
                self._db.executemany("DELETE FROM snapshots WHERE rowid = ?", bad)
        return kept

    def save(self, record: Record) -> None:
        with self._guard:
            self._pending[record.resource_id] = record
        self._wake.set()

    def forget(self, resource_id: str) -> None:
        with self._guard:
            self._pending[resource_id] = None
        self._wake.set()

    def close(self) -> None:
        """Write what is queued, then close (called once, at shutdown)."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ------------------------------------------------------------ writer
    def _write_loop(self) -> None:
        while True:
            self._wake.wait()
            if not self._stop:
                time.sleep(self.flush_every)  # coalesce: a burst of changes, one write
            self._wake.clear()
            self._flush()
            if self._stop:
                self._flush()  # what came in while the last write ran
                return

    def _flush(self) -> None:
        with self._guard:
            pending, self._pending = self._pending, {}
        if not pending or self._db is None:
            return
        rows = []
        gone = []
        for resource_id, record in pending.items():
            if record is None:
                gone.append((resource_id,))
                continue
            active = record.snapshot.get("status") in ACTIVE
            rows.append(
                (
                    resource_id,
                    record.snapshot.get("updated_at") or time.time(),
                    int(active),
                    orjson.dumps(record.__dict__),
                )
            )
        try:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)", rows)
            self._db.executemany("DELETE FROM snapshots WHERE id = ?", gone)
            self._db.execute("COMMIT")
            self.writes += len(rows)
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            if self.degraded is None:
                self._degrade(f"cannot write {self.path}: {exc}")


def default_path(upstream: str) -> Path:
    """``$XDG_STATE_HOME/sidecar/<upstream>.db`` (or ``~/.local/state``): one file per upstream."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    name = "".join(c if c.isalnum() or c in "-." else "_" for c in upstream.split("://", 1)[-1])
    return Path(base) / "sidecar" / f"{name.strip('_') or 'upstream'}.db"
