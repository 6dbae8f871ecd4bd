"""Users, passwords and API keys. Secrets are stored only as salted scrypt hashes."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from storage.common import row_or_not_found, utcnow
from storage.errors import CLI, AuthError, InputError, NotFound
from storage.store import StoreBase

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
KEY_PREFIX = "att"
MAX_KEY_NAME = 60


def hash_secret(secret: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_secret(secret: str, stored: str) -> bool:
    try:
        algo, n, r, p, salt, digest = stored.split("$")
        if algo != "scrypt":
            return False
        got = hashlib.scrypt(secret.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except (ValueError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name.strip()):
        raise InputError(
            "User names are 1-32 characters: letters, digits, '_', '.', '-', starting with a letter or digit."
        )
    return name.strip()


def validate_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise InputError(f"Passwords need at least {MIN_PASSWORD} characters.")
    if len(password) > MAX_PASSWORD or "\x00" in password:
        raise InputError(f"Passwords are at most {MAX_PASSWORD} characters, without NUL bytes.")
    return password


@dataclass(frozen=True)
class User:
    id: int
    name: str
    personalization: bool
    created_at: str


def _user(row: dict) -> User:
    return User(row["id"], row["name"], bool(row["personalization"]), row["created_at"])


class Users:
    def __init__(self, store: StoreBase):
        self.store = store

    def create(self, name: str, password: str) -> User:
        name, password = validate_name(name), validate_password(password)
        with self.store.write() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
                raise InputError(f"The user name {name!r} is taken; sign in instead or choose another name.")
            db["users"].insert({"name": name, "password_hash": hash_secret(password), "created_at": utcnow()})
        return self.by_name(name)

    def by_name(self, name: str) -> User:
        return _user(row_or_not_found(self.store.db, "SELECT * FROM users WHERE name = ?", [str(name).strip()],
                                      f"No user named {name!r}. Create one with: {CLI} users add NAME"))

    def by_id(self, user_id: int) -> User:
        return _user(row_or_not_found(self.store.db, "SELECT * FROM users WHERE id = ?", [user_id],
                                      f"No user with id {user_id}. List users with: {CLI} users list"))

    def list(self) -> list[User]:
        return [_user(r) for r in self.store.db.query("SELECT * FROM users ORDER BY id")]

    def count(self) -> int:
        return self.store.db["users"].count

    def authenticate(self, name: str, password: str) -> User:
        """The user if the password matches; one message for unknown name and wrong password alike."""
        rows = list(self.store.db.query("SELECT * FROM users WHERE name = ?", [str(name or "").strip()]))
        stored = rows[0]["password_hash"] if rows else hash_secret("timing-equaliser")
        if not verify_secret(str(password or ""), stored) or not rows:
            raise AuthError("Wrong user name or password.")
        return _user(rows[0])

    def set_personalization(self, user_id: int, enabled: bool) -> None:
        with self.store.write() as db:
            db.execute("UPDATE users SET personalization = ? WHERE id = ?", [int(bool(enabled)), user_id])

    def change_password(self, user_id: int, old: str, new: str) -> None:
        """Set a new password after checking the current one."""
        user = self.by_id(user_id)
        self.authenticate(user.name, old)
        new = validate_password(new)
        with self.store.write() as db:
            db.execute("UPDATE users SET password_hash = ? WHERE id = ?", [hash_secret(new), user_id])

    def new_api_key(self, user_id: int, name: str = "") -> str:
        """Create a key and return it; only its scrypt hash is kept, so it is shown once."""
        self.by_id(user_id)
        name = " ".join(str(name or "").split())
        if len(name) > MAX_KEY_NAME:
            raise InputError(f"Key names are at most {MAX_KEY_NAME} characters.")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(24)
        with self.store.write() as db:
            db["api_keys"].insert({"user_id": user_id, "key_id": key_id, "secret_hash": hash_secret(secret),
                                   "created_at": utcnow(), "name": name})
        return f"{KEY_PREFIX}-{key_id}-{secret}"

    def api_keys(self, user_id: int) -> list[dict]:
        """The user's keys that still work, newest first (id, name, created_at; never the secret)."""
        return list(self.store.db.query(
            "SELECT key_id, name, created_at FROM api_keys WHERE user_id = ? AND revoked_at IS NULL "
            "ORDER BY id DESC", [user_id]))

    def revoke_api_key(self, user_id: int, key_id: str) -> None:
        key_id = str(key_id or "").strip()
        if key_id.startswith(f"{KEY_PREFIX}-"):  # the whole key pasted: its id is the second part
            key_id = key_id.split("-", 2)[1]
        with self.store.write() as db:
            cur = db.execute("UPDATE api_keys SET revoked_at = ? WHERE user_id = ? AND key_id = ? "
                             "AND revoked_at IS NULL", [utcnow(), user_id, key_id])
        if cur.rowcount == 0:
            raise NotFound(f"No working key with id {key_id!r}; pick one from the list.")

    def api_key_live(self, key_id: str) -> bool:
        """Whether a key id is still valid (not revoked, its user not deleted)."""
        return bool(self.store.db.execute(
            "SELECT 1 FROM api_keys WHERE key_id = ? AND revoked_at IS NULL", [key_id]).fetchone())

    def by_api_key(self, key: str) -> User:
        parts = str(key or "").strip().split("-", 2)
        if len(parts) != 3 or parts[0] != KEY_PREFIX:
            raise AuthError(f"Invalid API key. Create one with: {CLI} users key NAME")
        rows = list(
            self.store.db.query(
                "SELECT * FROM api_keys WHERE key_id = ? AND revoked_at IS NULL", [parts[1]]
            )
        )
        if not rows or not verify_secret(parts[2], rows[0]["secret_hash"]):
            raise AuthError(f"Invalid API key. Create one with: {CLI} users key NAME")
        return self.by_id(rows[0]["user_id"])
