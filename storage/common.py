"""Small pieces every storage repository shares: the clock, id parsing, the chat roles and the
"one row or NotFound" read. Imports nothing from the rest of ``storage`` but its errors, so the
repositories (users, chats, adapters, jobs, replay, memories) and ``storage.db`` can all use it
without importing each other at run time.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from storage.errors import NotFound

ROLES = ("system", "user", "assistant")
"""The roles a stored message (and an imported or API message) can have."""


def utcnow() -> str:
    """Now, in UTC, as the ISO text every ``created_at``/``updated_at`` column holds (millisecond precision)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def as_int(value: Any, what: str = "id") -> int:
    """A positive 64-bit id from user input (int, integral float or digit string); NotFound otherwise.

    NotFound rather than InputError: to a caller, a malformed id and someone else's id look the same.
    """
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        number = int(value)
        if not 0 < number < 2**63:  # SQLite integers are 64-bit; ids are positive
            raise ValueError
        return number
    except (TypeError, ValueError, OverflowError):
        raise NotFound(f"{value!r} is not a valid {what}.") from None


def row_or_not_found(db: Any, sql: str, params: list, message: str) -> dict:
    """The first row ``sql`` returns, as a dict; ``NotFound(message)`` when there is none.

    ``db`` is a sqlite-utils ``Database``; ``message`` says what is missing and what to do next.
    """
    for row in db.query(sql, params):
        return row
    raise NotFound(message)
