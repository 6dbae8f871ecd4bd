"""Conversations, messages and feedback. Every call takes the user's id and sees only that user's rows."""

from __future__ import annotations

import json
import re
from typing import Any

from storage.common import ROLES, as_int, row_or_not_found, utcnow
from storage.errors import InputError
from storage.store import StoreBase

MAX_MESSAGE_CHARS = 1_000_000
MAX_TITLE_CHARS = 80
FEEDBACK_KINDS = ("like", "dislike", "clear", "correction")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL and lone surrogates (not valid UTF-8)


def clean_text(text: Any, what: str = "message", limit: int = MAX_MESSAGE_CHARS) -> str:
    """Validate and normalise user text: a non-empty string, at most ``limit`` characters.

    Lone surrogates (invalid UTF-8 smuggled in via JSON escapes) and NUL bytes become U+FFFD so
    the text can always be stored and tokenized; everything else (emoji, control characters) is kept.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise InputError(f"The {what} must be text, got {type(text).__name__}.")
    text = _UNSTORABLE.sub("\ufffd", text)
    if not text.strip():
        raise InputError(f"The {what} is empty; type something first.")
    if len(text) > limit:
        raise InputError(f"The {what} is {len(text):,} characters; the limit is {limit:,}. Split it into parts.")
    return text


def storable(text: str) -> str:
    """The text as it will be stored: NUL and lone surrogates become U+FFFD (what a stream shows must be what the
    log keeps, so generated text goes through this before anyone sees it)."""
    return _UNSTORABLE.sub("\ufffd", text)


def _title(text: str) -> str:
    line = " ".join(_UNSTORABLE.sub("\ufffd", text).split())  # a lone surrogate cannot be stored
    return line[: MAX_TITLE_CHARS - 1] + "…" if len(line) > MAX_TITLE_CHARS else line


def _message(row: dict) -> dict:
    row = dict(row)
    row["memory_ids"] = json.loads(row.get("memory_ids") or "[]")
    row["gen_settings"] = json.loads(row.get("gen_settings") or "{}")
    return row


class Chats:
    def __init__(self, store: StoreBase):
        self.store = store

    # conversations ---------------------------------------------------------------------------
    def create_conversation(self, user_id: int, title: str = "", source: str = "ui") -> int:
        now = utcnow()
        with self.store.write() as db:
            table = db["conversations"].insert(
                {"user_id": user_id, "title": _title(title) if title else "", "source": source,
                 "created_at": now, "updated_at": now}
            )
            return table.last_pk

    def conversation(self, user_id: int, conversation_id: Any) -> dict:
        return row_or_not_found(self.store.db, "SELECT * FROM conversations WHERE id = ? AND user_id = ?",
                                [as_int(conversation_id), user_id],
                                f"Conversation {conversation_id!r} does not exist (or is not yours).")

    def conversations(self, user_id: int, limit: int = 200) -> list[dict]:
        return list(
            self.store.db.query(
                "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS n_messages "
                "FROM conversations c WHERE c.user_id = ? ORDER BY c.updated_at DESC, c.id DESC LIMIT ?",
                [user_id, limit],
            )
        )

    def delete_conversation(self, user_id: int, conversation_id: Any) -> None:
        conv = self.conversation(user_id, conversation_id)
        with self.store.write() as db:
            db.execute("DELETE FROM conversations WHERE id = ? AND user_id = ?", [conv["id"], user_id])

    def rename_conversation(self, user_id: int, conversation_id: Any, title: Any) -> None:
        conv = self.conversation(user_id, conversation_id)
        title = _title(clean_text(title, what="title", limit=10_000))
        with self.store.write() as db:
            db.execute("UPDATE conversations SET title = ? WHERE id = ? AND user_id = ?", [title, conv["id"], user_id])

    # messages --------------------------------------------------------------------------------
    def add_message(self, user_id: int, conversation_id: Any, role: str, content: Any, replaces: int | None = None,
                    **meta: Any) -> int:
        """Insert and commit one message; returns its id. ``meta`` fills the optional columns. ``replaces``: an
        answer of this conversation that this one replaces (a retry), marked so in the same transaction, so the
        conversation never shows both, not even when the process stops between the two writes."""
        if role not in ROLES:
            raise InputError(f"role must be one of {', '.join(ROLES)}, got {role!r}.")
        # An assistant answer may legitimately be empty (stopped before the first token): stored as is.
        content = clean_text(content) if role == "user" else storable(str(content or ""))
        conv = self.conversation(user_id, conversation_id)
        row = {"conversation_id": conv["id"], "user_id": user_id, "role": role, "content": content,
               "created_at": utcnow()}
        for key in ("memory_ids", "gen_settings"):
            if key in meta:
                meta[key] = json.dumps(meta[key])
        row.update(meta)
        with self.store.write() as db:
            pk = db["messages"].insert(row).last_pk
            if replaces is not None:
                db.execute("UPDATE messages SET replaced_by = ? WHERE id = ? AND user_id = ? AND conversation_id = ?",
                           [pk, as_int(replaces), user_id, conv["id"]])
            updates = {"updated_at": row["created_at"]}
            if role == "user" and not conv["title"]:
                updates["title"] = _title(content)
            db["conversations"].update(conv["id"], updates)
        return pk

    def message(self, user_id: int, message_id: Any) -> dict:
        return _message(row_or_not_found(self.store.db, "SELECT * FROM messages WHERE id = ? AND user_id = ?",
                                         [as_int(message_id), user_id],
                                         f"Message {message_id!r} does not exist (or is not yours)."))

    def messages(self, user_id: int, conversation_id: Any, include_replaced: bool = False) -> list[dict]:
        conv = self.conversation(user_id, conversation_id)
        where = "" if include_replaced else " AND replaced_by IS NULL"
        return [
            _message(r)
            for r in self.store.db.query(
                f"SELECT * FROM messages WHERE conversation_id = ? AND user_id = ?{where} ORDER BY id",
                [conv["id"], user_id],
            )
        ]

    def mark_replaced(self, user_id: int, message_id: int, replaced_by: int) -> None:
        """A retry: the old answer stays in the log but is no longer part of the conversation."""
        self.message(user_id, message_id)
        with self.store.write() as db:
            db.execute(
                "UPDATE messages SET replaced_by = ? WHERE id = ? AND user_id = ?", [replaced_by, message_id, user_id]
            )

    def branch(self, user_id: int, conversation_id: Any, message_id: Any, text: Any) -> tuple[int, list[int]]:
        """An edited question: add it as a new message and mark the old question and everything after it
        replaced by it (kept in the log, no longer part of the conversation). Returns (new id, replaced ids)."""
        text = clean_text(text)
        msg = self.message(user_id, message_id)
        conv = self.conversation(user_id, conversation_id)
        if msg["role"] != "user" or msg["conversation_id"] != conv["id"] or msg["replaced_by"] is not None:
            raise InputError("Only a question shown in this conversation can be edited; pick it again.")
        with self.store.write() as db:
            later = [r[0] for r in db.execute(
                "SELECT id FROM messages WHERE conversation_id = ? AND user_id = ? AND id >= ? AND replaced_by IS NULL",
                [conv["id"], user_id, msg["id"]]).fetchall()]
            new_id = self.add_message(user_id, conv["id"], "user", text, source=msg["source"])
            db.execute(f"UPDATE messages SET replaced_by = ? WHERE id IN ({','.join('?' * len(later))})",
                       [new_id, *later])
        return new_id, later

    def all_messages(self, user_id: int) -> list[dict]:
        return [_message(r) for r in self.store.db.query("SELECT * FROM messages WHERE user_id = ? ORDER BY id",
                                                         [user_id])]

    # feedback --------------------------------------------------------------------------------
    def add_feedback(self, user_id: int, message_id: Any, kind: str, correction: Any = None,
                     source: str = "ui") -> int:
        if kind not in FEEDBACK_KINDS:
            raise InputError(f"feedback must be one of {', '.join(FEEDBACK_KINDS)}, got {kind!r}.")
        msg = self.message(user_id, message_id)
        if msg["role"] != "assistant":
            raise InputError("Feedback and corrections apply to the assistant's answers only.")
        if kind == "correction":
            correction = clean_text(correction, what="correction")
        elif correction is not None:
            raise InputError("A correction needs kind 'correction'.")
        with self.store.write() as db:
            return db["feedback"].insert(
                {"user_id": user_id, "message_id": msg["id"], "kind": kind, "correction": correction,
                 "source": source, "created_at": utcnow()}
            ).last_pk

    def feedback_state(self, user_id: int, message_id: Any) -> dict:
        """The current rating (``like``/``dislike``/None) and latest correction of one answer."""
        msg = self.message(user_id, message_id)
        rows = list(
            self.store.db.query(
                "SELECT kind, correction FROM feedback WHERE message_id = ? AND user_id = ? ORDER BY id",
                [msg["id"], user_id],
            )
        )
        rating, correction = None, None
        for r in rows:
            if r["kind"] == "correction":
                correction = r["correction"]
            else:
                rating = None if r["kind"] == "clear" else r["kind"]
        return {"rating": rating, "correction": correction}

    def ratings(self, user_id: int, conversation_id: Any) -> dict[int, str]:
        """Current 👍/👎 (``like``/``dislike``) per answer of one conversation, in one query."""
        conv = self.conversation(user_id, conversation_id)
        rows = self.store.db.query(
            "SELECT f.message_id, f.kind FROM feedback f JOIN messages m ON m.id = f.message_id "
            "WHERE m.conversation_id = ? AND f.user_id = ? AND f.kind IN ('like', 'dislike', 'clear') ORDER BY f.id",
            [conv["id"], user_id],
        )
        latest = {r["message_id"]: r["kind"] for r in rows}
        return {mid: kind for mid, kind in latest.items() if kind != "clear"}

    def corrections(self, user_id: int, conversation_id: Any) -> dict[int, str]:
        """Latest correction text per assistant message of one conversation."""
        conv = self.conversation(user_id, conversation_id)
        rows = self.store.db.query(
            "SELECT f.message_id, f.correction FROM feedback f JOIN messages m ON m.id = f.message_id "
            "WHERE m.conversation_id = ? AND f.user_id = ? AND f.kind = 'correction' ORDER BY f.id",
            [conv["id"], user_id],
        )
        return {r["message_id"]: r["correction"] for r in rows}

    def feedback(self, user_id: int) -> list[dict]:
        return list(self.store.db.query("SELECT * FROM feedback WHERE user_id = ? ORDER BY id", [user_id]))


_int = as_int  # the old private name, still imported by storage/memories.py; use storage.common.as_int
