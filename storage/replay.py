"""The per-user replay reservoir: a bounded, uniform sample of the examples a user's adapter has
already learned, mixed into later runs so that continuing training does not forget them.

Sampling is priority (bottom-k) sampling: every example gets a key from a hash of (seed, user,
message id) and the reservoir keeps the ``size`` smallest keys. That is a uniform random sample
of everything ever offered, like classic reservoir sampling, but needs no counter, is the same
whatever the order of offers, and offering an example twice (e.g. after a new correction)
replaces it instead of adding a copy. Rows cascade away with their message or user.
"""

from __future__ import annotations

import hashlib
import json

from storage.common import utcnow
from storage.store import StoreBase


def priority(user_id: int, message_id: int, seed: int = 0) -> float:
    """The example's key in [0, 1): a stable pseudo-random number."""
    digest = hashlib.sha256(f"replay:{seed}:{user_id}:{message_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Replay:
    """Reservoir rows of each user (``replay_examples``); every call takes the user's id."""

    def __init__(self, store: StoreBase):
        self.store = store

    def offer(self, user_id: int, examples: list[dict], size: int, seed: int = 0) -> int:
        """Offer examples (JSON-able dicts with a ``message_id``); keep the ``size`` best keys.

        Returns the reservoir's size afterwards. One transaction.
        """
        if size < 0:
            raise ValueError(f"size: must be >= 0, got {size}")
        with self.store.write() as db:
            for ex in examples:
                mid = int(ex["message_id"])
                key = priority(user_id, mid, seed)
                body = json.dumps({**ex, "priority": key})
                cur = db.execute("UPDATE replay_examples SET example = ? WHERE user_id = ? AND message_id = ?",
                                 [body, user_id, mid])
                if cur.rowcount == 0:
                    db["replay_examples"].insert({"user_id": user_id, "message_id": mid, "example": body,
                                                  "created_at": utcnow()})
            rows = [(r["id"], json.loads(r["example"]).get("priority", 1.0)) for r in db.query(
                "SELECT id, example FROM replay_examples WHERE user_id = ?", [user_id])]
            rows.sort(key=lambda r: r[1])
            doomed = [r[0] for r in rows[size:]]
            for i in range(0, len(doomed), 500):
                chunk = doomed[i:i + 500]
                db.execute(f"DELETE FROM replay_examples WHERE user_id = ? AND id IN ({', '.join('?' * len(chunk))})",
                           [user_id, *chunk])
            return min(len(rows), size)

    def sample(self, user_id: int, limit: int | None = None) -> list[dict]:
        """The reservoir's examples in key order (the first ``limit`` are themselves a uniform sample)."""
        rows = [json.loads(r["example"]) for r in self.store.db.query(
            "SELECT example FROM replay_examples WHERE user_id = ?", [user_id])]
        rows.sort(key=lambda e: e.get("priority", 1.0))
        return rows if limit is None else rows[:limit]

    def count(self, user_id: int) -> int:
        return int(self.store.db.execute("SELECT COUNT(*) FROM replay_examples WHERE user_id = ?",
                                         [user_id]).fetchone()[0])

    def clear(self, user_id: int) -> None:
        with self.store.write() as db:
            db.execute("DELETE FROM replay_examples WHERE user_id = ?", [user_id])
