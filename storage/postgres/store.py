"""``PostgresStore``: the Store API's connection on PostgreSQL (psycopg 3): one connection per thread, as on
SQLite, in autocommit mode (a statement outside ``write()`` commits at once; a ``write()`` block is one
transaction, committed before it returns), the migrations applied on open.

The write lock: SQLite's ``BEGIN IMMEDIATE`` lets one writer in at a time, and the repositories rely on it (check,
then insert: a user name, the next version number, the one open job). Here every outermost ``write()`` takes one
transaction-scoped advisory lock first, so writers from every process on the database queue the same way and reads
inside the block see everything committed before it. Reads take no lock.

Two more things only a server database gives: :meth:`PostgresStore.wait` listens on a channel (LISTEN/NOTIFY, on a
connection of its own per thread) and :meth:`PostgresStore.hold_lock` holds a named session-level advisory lock on a
connection of its own, which PostgreSQL releases when that connection ends, so a lock whose process died passes on.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from storage.config import redact
from storage.errors import StorageError
from storage.paths import DataDir
from storage.postgres import migrations
from storage.postgres.sql import PGDatabase
from storage.store import StoreBase

log = logging.getLogger("attune.storage")
WRITE_LOCK = 0x41747475_6E65_02  # pg_advisory_xact_lock key of write() ("Attune", 2)
LOCK_SPACE = 0x41747475  # hold_lock(name): pg_try_advisory_lock(LOCK_SPACE, hashtext(name)) ("Attu")
CONNECT_TIMEOUT_S = 10
_CHANNEL = re.compile(r"^[a-z_][a-z0-9_]*$")
USER_TABLES = ("users", "api_keys", "sessions", "conversations", "messages", "feedback", "memories",
               "memory_exclusions", "memory_text_exclusions", "adapter_versions", "active_adapters", "jobs",
               "replay_examples")
"""Tables that hold a user's rows: what :meth:`PostgresStore.compact` vacuums after a user is forgotten."""


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StorageError('A postgresql:// database needs psycopg 3, which is not installed: run `make setup` (or '
                           '.venv/bin/pip install "psycopg[binary]"), or leave --db out to use SQLite.') from None
    return psycopg


def _numbers(conn: Any) -> None:
    """NUMERIC results (``SUM`` of a BIGINT) as int, or float when fractional, as SQLite returns them."""
    from psycopg.types.numeric import NumericLoader

    class Loader(NumericLoader):
        def load(self, data: Any) -> Any:
            value = super().load(data)
            return int(value) if value.is_finite() and value == value.to_integral_value() else float(value)

    conn.adapters.register_loader("numeric", Loader)


class PostgresStore(StoreBase):
    """Attune's rows in a PostgreSQL database; the data dir keeps the files (adapters, memory indexes, models)."""

    kind = "postgresql"

    def __init__(self, data_dir: DataDir | Path | str, url: str):
        self.data_dir = data_dir if isinstance(data_dir, DataDir) else DataDir(Path(data_dir))
        self.data_dir.ensure()
        self.url = url
        self._local = threading.local()
        self._locks: dict[str, Any] = {}
        self._locks_guard = threading.Lock()
        psycopg = _psycopg()
        try:
            migrations.apply(self.db.conn)
        except psycopg.Error as e:
            raise StorageError(f"Cannot set up the PostgreSQL database {redact(url)}: {e}. The user needs the right "
                               "to create tables, functions and collations in it (PostgreSQL 15 or newer, with "
                               "ICU).") from e

    @property
    def db(self) -> PGDatabase:
        db = getattr(self._local, "db", None)
        if db is None or db.conn.closed:
            db = PGDatabase(self._connect())
            self._local.db = db
        return db

    def _connect(self) -> Any:
        psycopg = _psycopg()
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as e:
            reason = " ".join(str(e).split())
            raise StorageError(f"Cannot connect to the PostgreSQL database {redact(self.url)}: {reason}. Check that "
                               "the server is running and accepts this user from here, and that the URL names the "
                               "right host, port and database (a password comes from PGPASSWORD or ~/.pgpass)."
                               ) from None
        _numbers(conn)
        return conn

    @contextmanager
    def write(self) -> Iterator[PGDatabase]:
        """One atomic write, as :meth:`storage.store.SQLiteStore.write`: the outermost block takes the write lock
        (see the module docstring) and commits when it ends, or rolls back on any exception; nested blocks are
        savepoints."""
        db = self.db
        nested = db.conn.info.transaction_status != _psycopg().pq.TransactionStatus.IDLE
        with db.conn.transaction():
            if not nested:
                db.conn.execute("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK])
            yield db

    def integrity_ok(self) -> bool:
        """PostgreSQL checks its own pages; this says the server answers and every migration has been applied."""
        done = {r[0] for r in self.db.execute("SELECT name FROM _attune_migrations")}
        return done >= {name for name, _ in migrations.MIGRATIONS}

    def compact(self) -> None:
        """VACUUM the tables that held a user's rows: their space is reused. PostgreSQL's write-ahead log and any
        base backups or replicas keep old pages until they are recycled; rotate those as your policy says."""
        self.db.conn.execute(f"VACUUM {', '.join(USER_TABLES)}")

    def close(self) -> None:
        """Close this thread's connections (its listening ones too); locks held with :meth:`hold_lock` stay held."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None
        for conn in self._local.__dict__.pop("listeners", {}).values():
            conn.close()

    def wait(self, channel: str, timeout: float) -> bool:
        """LISTEN on ``channel`` (from the first call, on this thread's listening connection) and wait for one
        NOTIFY, at most ``timeout`` seconds. A lost connection is a StorageError; the next call listens anew."""
        if not _CHANNEL.match(channel):
            raise ValueError(f"{channel!r} is not a channel name")
        psycopg = _psycopg()
        listeners = self._local.__dict__.setdefault("listeners", {})
        conn = listeners.get(channel)
        try:
            if conn is None or conn.closed:
                conn = listeners[channel] = self._connect()
                conn.execute(f"LISTEN {channel}")
            for _ in conn.notifies(timeout=max(0.0, timeout), stop_after=1):
                return True
            return False
        except psycopg.Error as e:
            listeners.pop(channel, None)
            conn.close()
            raise StorageError(f"Lost the PostgreSQL connection listening for {channel} ({e}); it is opened again on "
                               "the next wait.") from e

    def hold_lock(self, name: str) -> bool:
        """Hold the advisory lock ``name`` on a connection kept for it: True while this process has it. A holder's
        connection is checked on each call, and the lock taken again if the server lost it (e.g. a restart)."""
        psycopg = _psycopg()
        with self._locks_guard:
            conn = self._locks.get(name)
            if conn is not None:
                try:
                    conn.execute("SELECT 1")
                    return True
                except psycopg.Error as e:
                    log.warning("lost the database lock %r (%s); trying to take it again", name, e)
                    self._locks.pop(name).close()
            conn = self._connect()
            got = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", [LOCK_SPACE, name]).fetchone()[0]
            if got:
                self._locks[name] = conn
            else:
                conn.close()
            return bool(got)

    def release_lock(self, name: str) -> None:
        with self._locks_guard:
            conn = self._locks.pop(name, None)
        if conn is not None:
            conn.close()  # the session ends: PostgreSQL releases its advisory locks
