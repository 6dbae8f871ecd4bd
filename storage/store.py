"""The connection the repositories share. :class:`StoreBase` is what a repository may use (the data dir, ``db``: this
thread's connection with the sqlite-utils calls the repositories make, ``write()``: one atomic write, ``wait()``: a
notification, ``hold_lock()``: a lock held while the process lives);
:class:`SQLiteStore` is it on a SQLite file: one connection per thread (WAL, durable commits, foreign keys), the
write lock (:meth:`SQLiteStore.write`) and the migrations applied on open. The PostgreSQL one is
``storage.postgres.store.PostgresStore``.

Repositories import this module, never ``storage.db`` (which composes them into ``Store``): no import circle,
counting type-only imports.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from storage.errors import StorageError
from storage.migrations import migrations
from storage.paths import DataDir


class StoreBase:
    """What repositories use, whichever database is behind it. ``db`` is this thread's connection: sqlite-utils'
    ``Database`` on SQLite, ``storage.postgres.sql.PGDatabase`` (the same calls, the same SQL) on PostgreSQL."""

    kind = ""
    """``sqlite`` or ``postgresql``."""
    data_dir: DataDir
    path: Path | None = None
    """The SQLite file; None on PostgreSQL."""

    @property
    def db(self) -> Any:
        raise NotImplementedError

    def write(self) -> AbstractContextManager:
        """One atomic write (``with store.write() as db: ...``), committed when the block ends; nested: a savepoint.
        Writers are serialized, so a read inside the block sees every write committed before it."""
        raise NotImplementedError

    def integrity_ok(self) -> bool:
        raise NotImplementedError

    def compact(self) -> None:
        """Give the space of deleted rows back (after forgetting a user), so their bytes do not linger."""
        raise NotImplementedError

    def close(self) -> None:
        """Close this thread's connection (the next use opens a new one)."""
        raise NotImplementedError

    def wait(self, channel: str, timeout: float) -> bool:
        """Block until something is announced on ``channel`` (PostgreSQL's LISTEN/NOTIFY), at most ``timeout``
        seconds; True if it was. The first call starts listening. SQLite announces nothing: it sleeps ``timeout`` and
        returns False, and the caller looks again (polling)."""
        time.sleep(max(0.0, timeout))
        return False

    def hold_lock(self, name: str) -> bool:
        """Take, or keep, the lock ``name`` for as long as this process lives (True while it is this process's).
        One holder across every process on the database; it passes on when its holder exits or dies. On SQLite,
        whose processes share one machine and one file, every process holds it (nothing is shared out)."""
        return True

    def release_lock(self, name: str) -> None:
        """Give the lock ``name`` up, if this process holds it."""


class SQLiteStore(StoreBase):
    """The SQLite source of truth. Safe to share across threads: each thread gets its own connection.

    Writes are committed (WAL, ``synchronous=FULL``) before the call returns, so anything a caller
    has acknowledged survives a crash of the process.
    """

    kind = "sqlite"

    def __init__(self, data_dir: DataDir | Path | str, path: Path | None = None):
        self.data_dir = data_dir if isinstance(data_dir, DataDir) else DataDir(Path(data_dir))
        self.data_dir.ensure()
        self.path = Path(path) if path is not None else self.data_dir.db_path
        self._local = threading.local()
        try:
            db = self.db
            db.enable_wal()
            migrations.apply(db)
        except sqlite3.DatabaseError as e:
            raise StorageError(
                f"Cannot open the database {self.path}: {e}. If the file is damaged, move it aside and restore a "
                "backup (or start with an empty --data-dir)."
            ) from e

    @property
    def db(self) -> Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
            db = Database(conn)
            self._local.db = db
        return db

    @contextmanager
    def write(self) -> Iterator[Database]:
        """One atomic write (``with store.write() as db: ...``); every raw UPDATE/DELETE goes through it.

        ``BEGIN IMMEDIATE`` takes the write lock up front, so concurrent writers wait (busy timeout)
        instead of failing when a read snapshot cannot be upgraded. Nested calls become savepoints.
        """
        db = self.db
        if db.conn.in_transaction:
            with db.atomic():
                yield db
            return
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
        db.conn.execute("COMMIT")

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def compact(self) -> None:
        """VACUUM, then truncate the WAL: nothing deleted stays in free pages or the log."""
        self.db.execute("VACUUM")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None
