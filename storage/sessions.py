"""Browser sessions: a random id handed to the browser once (in a cookie), stored only as its
SHA-256, with an expiry; revoking sets ``revoked_at``. The web layer turns cookies into users here."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from storage.store import StoreBase
from storage.users import User, Users, _user

TOKEN_BYTES = 32
TOUCH_EVERY = timedelta(minutes=5)  # last_seen_at is refreshed at most this often (one write per window)


def _digest(token: str) -> str:
    # The id is 256 random bits, so a plain hash is enough: nobody can guess a preimage.
    return hashlib.sha256(str(token).encode("utf-8", "replace")).hexdigest()


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


class Sessions:
    def __init__(self, store: StoreBase, users: Users):
        self.store = store
        self.users = users

    def create(self, user_id: int, ttl: timedelta) -> str:
        """A new session for the user; returns the id to put in the cookie (never stored as is)."""
        self.users.by_id(user_id)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = datetime.now(UTC)
        with self.store.write() as db:
            db["sessions"].insert({"user_id": user_id, "token_hash": _digest(token), "created_at": _iso(now),
                                   "expires_at": _iso(now + ttl), "last_seen_at": _iso(now)})
        return token

    def user(self, token: str | None) -> User | None:
        """The user of a live session (not expired, not revoked), or None."""
        if not token or len(token) > 256:
            return None
        rows = list(self.store.db.query(
            "SELECT s.id AS session_id, s.expires_at, s.last_seen_at, u.* FROM sessions s "
            "JOIN users u ON u.id = s.user_id WHERE s.token_hash = ? AND s.revoked_at IS NULL", [_digest(token)]))
        if not rows:
            return None
        row, now = rows[0], datetime.now(UTC)
        if datetime.fromisoformat(row["expires_at"]) <= now:
            return None
        if now - datetime.fromisoformat(row["last_seen_at"]) > TOUCH_EVERY:
            with self.store.write() as db:
                db.execute("UPDATE sessions SET last_seen_at = ? WHERE id = ?", [_iso(now), row["session_id"]])
        return _user(row)

    def revoke(self, token: str | None) -> None:
        if not token:
            return
        with self.store.write() as db:
            db.execute("UPDATE sessions SET revoked_at = ? WHERE token_hash = ? AND revoked_at IS NULL",
                       [_iso(datetime.now(UTC)), _digest(token)])

    def revoke_all(self, user_id: int, keep: str | None = None) -> int:
        """Sign the user out everywhere (except the session ``keep``); returns how many were revoked."""
        with self.store.write() as db:
            cur = db.execute(
                "UPDATE sessions SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL AND token_hash != ?",
                [_iso(datetime.now(UTC)), user_id, _digest(keep) if keep else ""])
            return cur.rowcount

    def purge(self) -> int:
        """Delete expired and revoked sessions; returns how many rows went."""
        with self.store.write() as db:
            cur = db.execute("DELETE FROM sessions WHERE revoked_at IS NOT NULL OR expires_at <= ?",
                             [_iso(datetime.now(UTC))])
            return cur.rowcount
