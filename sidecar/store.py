"""Where snapshots outlive the process: a store behind one small interface.

The registry keeps every snapshot in memory and reads them there; a store
only has to remember them across a restart. Its verbs:

* :meth:`Store.load` at start: every kept record, oldest first;
* :meth:`Store.save` on a change: never waits on the disk (the record is
  queued, and a writer thread writes what is queued every ``store_flush``
  seconds, one transaction, the newest record of each resource only);
* :meth:`Store.forget` when a snapshot is evicted;
* :meth:`Store.close` at shutdown: what is queued is written.

Two kinds: :class:`MemoryStore` keeps nothing (``store = "memory"``) and
:class:`SqliteStore` keeps a file (``store = "sqlite:PATH"``, the default).
A store that cannot be used never stops the proxy: it says so in one log
line, a corrupt file is moved aside, and the sidecar goes on in memory with
``degraded`` set (``/readyz`` and ``sidecar_store_degraded`` report it). Two
processes cannot use one file: the second is refused at start
(:class:`StoreInUse`), as is a file written by a newer schema
(:class:`StoreTooNew`).

After a SIGKILL, at most the changes of the last ``store_flush`` interval
are lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .snapshot import ACTIVE

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "SCHEMA_VERSION",
    "MemoryStore",
    "Record",
    "SqliteStore",
    "Store",
    "StoreInUse",
    "StoreTooNew",
    "open_store",
]

log = logging.getLogger("sidecar.store")

SCHEMA_VERSION = 1


class StoreInUse(RuntimeError):
    """Another process has the file open."""


class StoreTooNew(RuntimeError):
    """The file was written by a newer schema than this version knows."""


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

    def __init__(self, path: Path, flush_every: float, retention: float) -> None:
        self.path = path
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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(str(self.path) + ".lock", "a+")
        except OSError as exc:
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
        except BaseException:
            db.close()
            raise
        return db

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
            rows = self._db.execute("SELECT record FROM snapshots ORDER BY updated").fetchall()
        except sqlite3.Error as exc:
            self._degrade(f"cannot read {self.path}: {exc}")
            return []
        records = []
        for (blob,) in rows:
            try:
                data = orjson.loads(blob)
                records.append(Record(**data))
            except (orjson.JSONDecodeError, TypeError):
                continue  # one bad row costs that row only
        return records

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


def open_store(settings: Settings) -> Store:
    """``memory``, ``sqlite:PATH``, ``sqlite`` (the default path for this
    upstream), or ``redis://…`` (shared: :mod:`sidecar.fleet`)."""
    spec = settings.store
    if spec == "memory":
        return MemoryStore()
    if spec.startswith(("redis://", "rediss://")):
        from .fleet import RedisStore

        return RedisStore(
            spec,
            prefix=settings.store_prefix,
            password=settings.store_password,
            timeout=settings.store_timeout,
            lease_ttl=settings.lease_ttl,
            retention=settings.retention,
        )
    upstream, flush_every, retention = settings.upstream, settings.store_flush, settings.retention
    path = Path(spec.partition(":")[2]) if spec.startswith("sqlite:") else default_path(upstream)
    store = SqliteStore(path, flush_every, retention)
    store.open()
    return store
