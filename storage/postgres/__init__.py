"""Attune's rows on PostgreSQL (``--db postgresql://...``), behind the same Store API as SQLite.

Owns: the connection wrapper that gives the repositories the sqlite-utils calls they make on PostgreSQL
(``sql``: ``query``/``execute``/``db[table].insert(...).last_pk``, ``?`` placeholders and the few SQLite-only
forms translated in one place), the PostgreSQL schema with its own append-only migrations (``migrations``) and
the per-thread connections with the write lock (``store``). Repositories keep one SQL text for both databases.

Must not know: models, serving, training; nor anything of SQLite's files. ``psycopg`` (3) is imported only when a
PostgreSQL URL is opened, so the SQLite default never needs it.
"""
