"""``Store``: the database every package uses, opened once per data dir.

``Store`` is the shared connection (``storage.store.SQLiteStore`` by default, ``storage.postgres.store.PostgresStore``
for a ``postgresql://`` URL, see ``storage.config.StoreConfig``) plus one repository per table group (users, chats,
memories, adapters, jobs, replay, sessions, throttle). Repositories get the connection and the other repositories
they need here; none imports this module, so there is no import circle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from storage.adapters import Adapters
from storage.chats import Chats
from storage.common import utcnow
from storage.config import POSTGRESQL, StoreConfig
from storage.jobs import Jobs
from storage.memories import Memories
from storage.objects import AdapterStoreConfig
from storage.paths import DataDir
from storage.replay import Replay
from storage.sessions import Sessions
from storage.store import SQLiteStore, StoreBase
from storage.throttle import Throttle
from storage.users import Users

__all__ = ["Store", "StoreConfig", "open_database", "utcnow"]  # utcnow lives in storage.common (older imports)


def open_database(data_dir: DataDir | Path | str, config: StoreConfig | str | None = None) -> StoreBase:
    """The connection for ``config`` (a :class:`StoreConfig`, a URL, or None: ``attune.db`` in the data dir)."""
    config = config if isinstance(config, StoreConfig) else StoreConfig(config or "")
    data_dir = data_dir if isinstance(data_dir, DataDir) else DataDir(Path(data_dir))
    if config.kind == POSTGRESQL:
        from storage.postgres.store import PostgresStore  # psycopg only when a PostgreSQL URL is used

        return PostgresStore(data_dir, config.postgres_url)
    return SQLiteStore(data_dir, config.sqlite_path(data_dir.db_path))


class Store(StoreBase):
    """The database (:func:`open_database`) and its repositories, one per table group; ``adapter_store`` is where
    this process publishes adapter versions (``storage.objects``; default: the data dir only)."""

    def __init__(self, data_dir: DataDir | Path | str, db: StoreConfig | str | None = None,
                 adapter_store: AdapterStoreConfig | str | None = None):
        self.config = db if isinstance(db, StoreConfig) else StoreConfig(db or "")
        self.adapter_store = adapter_store if isinstance(adapter_store, AdapterStoreConfig) else \
            AdapterStoreConfig(adapter_store or "")
        self.database = open_database(data_dir, self.config)
        self.data_dir, self.kind, self.path = self.database.data_dir, self.database.kind, self.database.path
        self.users = Users(self)
        self.chats = Chats(self)
        self.memories = Memories(self, self.chats)
        self.throttle = Throttle(self)
        self.jobs = Jobs(self)
        self.replay = Replay(self)
        self.adapters = Adapters(self, self.users, self.jobs, self.replay, self.adapter_store)
        self.sessions = Sessions(self, self.users)

    @property
    def db(self) -> Any:
        return self.database.db

    @contextmanager
    def write(self) -> Iterator[Any]:
        with self.database.write() as db:
            yield db

    def integrity_ok(self) -> bool:
        return self.database.integrity_ok()

    def compact(self) -> None:
        self.database.compact()

    def close(self) -> None:
        self.database.close()

    def wait(self, channel: str, timeout: float) -> bool:
        return self.database.wait(channel, timeout)

    def hold_lock(self, name: str) -> bool:
        return self.database.hold_lock(name)

    def release_lock(self, name: str) -> None:
        self.database.release_lock(name)
