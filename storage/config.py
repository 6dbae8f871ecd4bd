"""``StoreConfig``: which database holds Attune's rows (``--db URL``). Parses and checks the URL only; opening
it is ``storage.db.Store``'s job. Imports nothing but the standard library and ``storage.errors``.

``sqlite:///PATH`` is a SQLite file (``sqlite:///relative/to/cwd.db``, ``sqlite:////absolute/path.db``, as in
SQLAlchemy); ``postgresql://USER[:PASSWORD]@HOST[:PORT]/NAME`` (or ``postgres://``) a PostgreSQL database through
psycopg 3. Empty: ``attune.db`` in the data dir, the default and the only choice before ``--db`` existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

SQLITE, POSTGRESQL = "sqlite", "postgresql"
_SCHEMES = {"sqlite": SQLITE, "postgresql": POSTGRESQL, "postgres": POSTGRESQL}


@dataclass(frozen=True)
class StoreConfig:
    """The database (``launch.py ... --db URL``)."""

    db: str = ""
    """the database: sqlite:///FILE (sqlite:////abs/path.db) or postgresql://USER@HOST:PORT/NAME (psycopg 3; a
    password from PGPASSWORD or ~/.pgpass); empty: attune.db in the data dir"""

    def __post_init__(self):
        if not isinstance(self.db, str):
            raise ValueError(f"db: must be a URL string, got {type(self.db).__name__}")
        object.__setattr__(self, "db", self.db.strip())
        if not self.db:
            return
        scheme = self.db.partition(":")[0].lower()
        if "://" not in self.db or scheme not in _SCHEMES:
            raise ValueError(f"db: {redact(self.db)!r} is not a database URL Attune knows; use sqlite:///FILE.db or "
                             "postgresql://USER@HOST:PORT/NAME (or leave --db out for attune.db in the data dir)")
        sqlite_file = self.db[len("sqlite:///"):] if self.db.lower().startswith("sqlite:///") else ""
        if self.kind == SQLITE and not sqlite_file:
            raise ValueError(f"db: {redact(self.db)!r} names no database; write sqlite:///FILE.db (three slashes, "
                             "four for an absolute path) or postgresql://USER@HOST:PORT/NAME")

    @property
    def kind(self) -> str:
        """``sqlite`` (also for the empty default) or ``postgresql``."""
        return _SCHEMES[self.db.partition(":")[0].lower()] if self.db else SQLITE

    def sqlite_path(self, default: Path) -> Path:
        """The SQLite file: the URL's path (relative to the working directory), else ``default``."""
        if self.kind != SQLITE:
            raise ValueError(f"db: {redact(self.db)!r} is not a SQLite URL")
        return Path(self.db[len("sqlite:///"):]).expanduser().resolve() if self.db else default

    @property
    def postgres_url(self) -> str:
        """The URL as libpq takes it (``postgres://`` spelled ``postgresql://``)."""
        if self.kind != POSTGRESQL:
            raise ValueError(f"db: {redact(self.db)!r} is not a PostgreSQL URL")
        return POSTGRESQL + self.db[self.db.index(":"):]


def redact(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<an unreadable URL>"
