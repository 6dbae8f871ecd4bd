"""The sqlite-utils calls the repositories make, on a psycopg 3 connection, with one SQL text for both databases.

:class:`PGDatabase` offers the subset of ``sqlite_utils.Database`` that ``storage`` uses: ``query`` (dict rows),
``execute`` (a cursor: ``fetchone``, ``fetchall``, iteration, ``rowcount``), ``db[table].insert(row).last_pk``,
``db[table].update(id, values)``, ``db[table].count`` and ``table_names()``. :func:`translate` turns the SQLite
spelling the repositories write into PostgreSQL's; this is the one place where the dialects differ in SQL text:

- ``?`` placeholders become ``%s`` (and a literal ``%`` becomes ``%%``), outside quoted strings only;
- ``INSERT OR IGNORE INTO ...`` becomes ``INSERT INTO ... ON CONFLICT DO NOTHING``;
- ``LIKE`` becomes ``ILIKE``: SQLite's LIKE ignores ASCII case, and so does ILIKE on the schema's ``"C"`` text.

SQLite's JSON functions (``json``, ``json_patch``, ``json_set``, ``json_insert``) are not rewritten: the schema
defines them in PostgreSQL (``storage.postgres.migrations``). psycopg is imported by the caller that connects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

_QUOTED = re.compile(r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\")")
_OR_IGNORE = re.compile(r"^\s*INSERT\s+OR\s+IGNORE\s+INTO\b", re.IGNORECASE)
_LIKE = re.compile(r"\bLIKE\b", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@lru_cache(maxsize=2048)
def translate(sql: str) -> str:
    """``sql`` as written for SQLite, spelled for PostgreSQL through psycopg (see the module docstring)."""
    ignore = bool(_OR_IGNORE.match(sql))
    if ignore:
        sql = _OR_IGNORE.sub("INSERT INTO", sql, count=1).rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
    out = []
    for i, part in enumerate(_QUOTED.split(sql)):
        if i % 2:  # a quoted string or identifier: kept as is, but psycopg reads % everywhere
            out.append(part.replace("%", "%%"))
        else:
            out.append(_LIKE.sub("ILIKE", part.replace("%", "%%").replace("?", "%s")))
    return "".join(out)


def _param(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value  # SQLite stores booleans as 0/1 in INTEGER columns


def _params(params: Sequence | None) -> list:
    return [_param(v) for v in (params or ())]


def _name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a table or column name")
    return f'"{name}"'


class PGDatabase:
    """One psycopg connection (autocommit: a statement outside ``store.write()`` commits at once, like sqlite-utils'
    own inserts) with sqlite-utils' calls."""

    def __init__(self, conn: Any):
        self.conn = conn
        self._id_tables: set[str] | None = None

    def execute(self, sql: str, params: Sequence | None = None) -> Any:
        """Run one statement; returns its psycopg cursor (tuple rows)."""
        return self.conn.execute(translate(sql), _params(params))

    def query(self, sql: str, params: Sequence | None = None) -> Iterator[dict]:
        """The rows of one query, as dicts."""
        from psycopg.rows import dict_row

        cursor = self.conn.cursor(row_factory=dict_row)
        cursor.execute(translate(sql), _params(params))
        yield from cursor

    def __getitem__(self, table: str) -> Table:
        return Table(self, table)

    def table_names(self) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
            "ORDER BY table_name")]

    def has_id(self, table: str) -> bool:
        """Whether ``table`` has an ``id`` column (the primary key an insert returns)."""
        if self._id_tables is None or table not in self._id_tables:
            self._id_tables = {r[0] for r in self.conn.execute(
                "SELECT table_name FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND column_name = 'id'")}
        return table in self._id_tables


class Table:
    """``db[name]``: the sqlite-utils table calls the repositories make."""

    def __init__(self, db: PGDatabase, name: str):
        self.db, self.name = db, name
        self.last_pk: int | None = None

    def insert(self, record: dict) -> Table:
        """Insert one row; ``last_pk`` is its ``id`` (None for tables without one). Dicts and lists are stored as
        JSON text and booleans as 0/1, as sqlite-utils does."""
        columns = ", ".join(_name(c) for c in record)
        values = [json.dumps(v) if isinstance(v, dict | list | tuple) else _param(v) for v in record.values()]
        returning = " RETURNING id" if self.db.has_id(self.name) else ""
        cursor = self.db.conn.execute(
            f"INSERT INTO {_name(self.name)} ({columns}) VALUES ({', '.join(['%s'] * len(values))}){returning}",
            values)
        self.last_pk = cursor.fetchone()[0] if returning else None
        return self

    def update(self, pk: int, updates: dict) -> Table:
        """Set ``updates`` on the row whose ``id`` is ``pk``."""
        if updates:
            assignments = ", ".join(f"{_name(c)} = %s" for c in updates)
            self.db.conn.execute(f"UPDATE {_name(self.name)} SET {assignments} WHERE id = %s",
                                 [*(_param(v) for v in updates.values()), pk])
        self.last_pk = pk
        return self

    @property
    def count(self) -> int:
        return int(self.db.conn.execute(f"SELECT COUNT(*) FROM {_name(self.name)}").fetchone()[0])
