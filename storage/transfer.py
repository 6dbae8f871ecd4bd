"""Import of conversation histories (JSONL), export of all of a user's data, and deleting a user's rows
and files.

Forgetting a user as a whole (stopping their training process, dropping their loaded memory index,
then deleting) is a use case above storage: ``assistant.chat.account.forget_user``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.chats import clean_text
from storage.common import ROLES, utcnow
from storage.errors import InputError, StorageError
from storage.paths import remove_tree

if TYPE_CHECKING:
    from storage.db import Store

MAX_IMPORT_BYTES = 200 * 1024 * 1024


def parse_history(path: Path) -> list[list[dict]]:
    """Validate a whole JSONL file before anything is written; errors name the line and what to fix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"No file at {path}.")
    if path.stat().st_size > MAX_IMPORT_BYTES:
        raise InputError(f"{path} is larger than {MAX_IMPORT_BYTES // 2**20} MiB; split it into several files.")
    conversations = []
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}); export it as UTF-8 JSONL.") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path.name} line {n}: not valid JSON ({e.msg}). One conversation object per line.") \
                from None
        conversations.append(_conversation(obj, f"{path.name} line {n}"))
    if not conversations:
        raise InputError(f"{path} holds no conversations. Expected one {{\"messages\": [...]}} object per line.")
    return conversations


def _conversation(obj: Any, where: str) -> list[dict]:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise InputError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}.')
    out = []
    for i, m in enumerate(obj["messages"]):
        at = f"{where}, message {i + 1}"
        if not isinstance(m, dict):
            raise InputError(f"{at}: each message must be an object with role and content.")
        role = m.get("role")
        if role not in ROLES:
            raise InputError(f"{at}: role must be system, user or assistant, got {role!r}.")
        try:
            content = clean_text(m.get("content"), what="content")
        except InputError as e:
            raise InputError(f"{at}: {e}") from None
        fb, corr = m.get("feedback"), m.get("correction")
        if (fb is not None or corr is not None) and role != "assistant":
            raise InputError(f"{at}: feedback and correction belong on assistant messages.")
        if fb not in (None, "like", "dislike"):
            raise InputError(f"{at}: feedback must be 'like' or 'dislike', got {fb!r}.")
        if corr is not None:
            try:
                corr = clean_text(corr, what="correction")
            except InputError as e:
                raise InputError(f"{at}: {e}") from None
        out.append({"role": role, "content": content, "feedback": fb, "correction": corr})
    return out


def import_history(store: Store, user_id: int, path: Path) -> dict:
    """Add every conversation of the file for the user in one transaction (all or nothing)."""
    conversations = parse_history(path)
    counts = {"conversations": 0, "messages": 0, "feedback": 0}
    with store.write() as db:
        for msgs in conversations:
            now = utcnow()
            first_user = next((m["content"] for m in msgs if m["role"] == "user"), "")
            title = " ".join(first_user.split())[:80]
            cid = db["conversations"].insert(
                {"user_id": user_id, "title": title, "source": "import", "created_at": now, "updated_at": now}
            ).last_pk
            counts["conversations"] += 1
            for m in msgs:
                mid = db["messages"].insert(
                    {"conversation_id": cid, "user_id": user_id, "role": m["role"], "content": m["content"],
                     "source": "import", "created_at": utcnow()}
                ).last_pk
                counts["messages"] += 1
                for kind, corr in ((m["feedback"], None), ("correction" if m["correction"] else None, m["correction"])):
                    if kind:
                        db["feedback"].insert({"user_id": user_id, "message_id": mid, "kind": kind,
                                               "correction": corr, "source": "import", "created_at": utcnow()})
                        counts["feedback"] += 1
    return counts


def export_user(store: Store, user_id: int) -> dict:
    """Everything Attune holds about one user, as JSON-ready data (no password or key hashes)."""
    user = store.users.by_id(user_id)
    conversations = []
    for conv in store.chats.conversations(user_id, limit=10**9):
        conversations.append({**conv, "messages": store.chats.messages(user_id, conv["id"], include_replaced=True)})
    return {
        "user": {"id": user.id, "name": user.name, "created_at": user.created_at,
                 "personalization": user.personalization},
        "conversations": conversations,
        "feedback": store.chats.feedback(user_id),
        "memories": list(store.db.query("SELECT id, kind, text, message_id, created_at FROM memories "
                                        "WHERE user_id = ? ORDER BY id", [user_id])),
        "adapter_versions": list(store.db.query(
            "SELECT version, status, base_model, metrics, gate_reason, created_at FROM adapter_versions "
            "WHERE user_id = ? ORDER BY version", [user_id])),
    }


def delete_user(store: Store, user_id: int) -> None:
    """Delete the user's objects in the adapter store, their rows (cascading to all their data) and every file of
    theirs under the data dir, then VACUUM so nothing of theirs is left in free pages or the WAL (``Store.compact``).

    Rows and files only: stop the user's training process first (``assistant.chat.account.forget_user``
    does), or a job may re-create files after this returns.
    """
    store.users.by_id(user_id)
    try:
        store.adapters.delete_objects(user_id)  # first: should the store be unreachable, nothing is deleted yet
    except StorageError as e:
        raise StorageError(f"{e} Nothing of the user was deleted; run forget again once the adapter store "
                           "answers.") from e
    with store.write() as db:
        db.execute("DELETE FROM users WHERE id = ?", [user_id])
        db.execute("DELETE FROM memory_epochs WHERE user_id = ?", [user_id])  # re-raised as the cascade deleted
    for path in store.data_dir.user_files(user_id):
        remove_tree(path)
    store.compact()
