"""``Store``: the database every package uses, opened once per data dir.

``Store`` is the shared connection (``storage.store.SQLiteStore``) plus one repository per table group (users,
chats, memories, adapters, jobs, replay, sessions, throttle). Repositories get the connection and the other
repositories they need here; none imports this module, so there is no import circle.
"""

from __future__ import annotations

from pathlib import Path

from storage.adapters import Adapters
from storage.chats import Chats
from storage.common import utcnow
from storage.jobs import Jobs
from storage.memories import Memories
from storage.paths import DataDir
from storage.replay import Replay
from storage.sessions import Sessions
from storage.store import SQLiteStore
from storage.throttle import Throttle
from storage.users import Users

__all__ = ["Store", "utcnow"]  # utcnow lives in storage.common; re-exported for older imports


class Store(SQLiteStore):
    """The database (:class:`SQLiteStore`) and its repositories, one per table group."""

    def __init__(self, data_dir: DataDir | Path | str):
        super().__init__(data_dir)
        self.users = Users(self)
        self.chats = Chats(self)
        self.memories = Memories(self, self.chats)
        self.throttle = Throttle(self)
        self.jobs = Jobs(self)
        self.replay = Replay(self)
        self.adapters = Adapters(self, self.users, self.jobs, self.replay)
        self.sessions = Sessions(self, self.users)
