"""The SQLite connection the repositories share: the data dir, one connection per thread (WAL, durable commits,
foreign keys), the write lock (:meth:`SQLiteStore.write`) and the migrations applied on open.

Repositories import this module, never ``storage.db`` (which composes them into ``Store``): no import circle,
counting type-only imports.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlite_utils import Database

from storage.errors import StorageError
from storage.migrations import migrations
from storage.paths import DataDir


class SQLiteStore:
    """The SQLite source of truth. Safe to share across threads: each thread gets its own connection.

    Writes are committed (WAL, ``synchronous=FULL``) before the call returns, so anything a caller
    has acknowledged survives a crash of the process.
    """

    def __init__(self, data_dir: DataDir | Path | str):
        self.data_dir = data_dir if isinstance(data_dir, DataDir) else DataDir(Path(data_dir))
        self.data_dir.ensure()
        self.path = self.data_dir.db_path
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

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None
