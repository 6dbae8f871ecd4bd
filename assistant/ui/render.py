"""Rendering a stored conversation for the Chatbot: each answer (its correction, if any) followed by
a collapsed details line saying which model and adapter version answered, which memories it used,
whether it was stopped or cut at the token limit, and the earlier answers a retry replaced. Everything
comes from SQLite, so the details survive reloads and conversation switches."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from assistant.ui.i18n import tr

PRIVATE = {"api_visibility": "private"}
"""Keyword arguments of every UI event: UI events are not a public API (that is /v1)."""

INFO_RE = re.compile(r'\s*<details class="turn-info">[\s\S]*</details>\s*$')
TITLE_CHARS = 40


@dataclass
class Rendered:
    """What the chat tab shows for one conversation."""

    chat: list[dict] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # the message id behind each chat entry
    ratings: list[str | None] = field(default_factory=list)
    last_cut: bool = False  # the last answer stopped at the token limit (it can be continued)
    versions: list[int] = field(default_factory=list)  # the last answer's versions (retries), oldest first
    version: int | None = None  # which of them is shown (the newest unless one was picked)


def strip_info(text: str) -> str:
    """An answer's text without the details block (what the user edits and what is saved)."""
    return INFO_RE.sub("", text or "")


def short_title(title: str) -> str:
    """A conversation title that fits the sidebar: cut at a word boundary."""
    title = " ".join((title or "").split()) or "…"
    if len(title) <= TITLE_CHARS:
        return title
    cut = title[:TITLE_CHARS].rsplit(" ", 1)[0]
    return (cut if len(cut) > TITLE_CHARS // 2 else title[:TITLE_CHARS]) + "…"


def render(store, memory, lang: str, user_id: int, cid: int | None, version: int | None = None) -> Rendered:
    """The conversation as stored; ``version`` (a message id among the last answer's versions) shows that
    earlier answer in place of the newest one, with its own rating, correction and details."""
    out = Rendered()
    if cid is None:
        return out
    msgs = store.chats.messages(user_id, cid, include_replaced=True)
    corrections = store.chats.corrections(user_id, cid)
    rated = store.chats.ratings(user_id, cid)
    replaced_into: dict[int, list[dict]] = {}
    for m in msgs:
        if m["replaced_by"] is not None and m["role"] == "assistant":
            replaced_into.setdefault(m["replaced_by"], []).append(m)
    shown = [m for m in msgs if m["replaced_by"] is None and m["role"] != "system"]
    picked = None
    if shown and shown[-1]["role"] == "assistant":
        earlier = _chain(replaced_into, shown[-1]["id"])
        out.versions = [m["id"] for m in earlier] + [shown[-1]["id"]]
        picked = next((m for m in earlier if m["id"] == version), None)
        out.version = picked["id"] if picked else shown[-1]["id"]
        if picked:
            shown[-1] = picked
    used_ids = sorted({i for m in shown if m["role"] == "assistant" for i in m["memory_ids"]})
    memories = {}
    if memory is not None and used_ids:
        memories = {mem.id: mem for mem in memory.used(user_id, used_ids)}
    for m in shown:
        content = corrections.get(m["id"], m["content"])
        if m["role"] == "assistant":
            out.ratings.append({"like": "Like", "dislike": "Dislike"}.get(rated.get(m["id"])))
            earlier = [] if m is picked else _chain(replaced_into, m["id"])
            content = (content or "…") + details(lang, m, memories, earlier, corrections)
        out.chat.append({"role": m["role"], "content": content or "…"})
        out.ids.append(m["id"])
    last = shown[-1] if shown else None
    out.last_cut = bool(not picked and last and last["role"] == "assistant" and last["status"] == "complete"
                        and last["gen_settings"].get("finish_reason") == "length")
    return out


def version_choices(r: Rendered) -> list[tuple[str, int]]:
    """The selector's choices for the last answer's versions: "1/2", "2/2", ..."""
    return [(f"{n}/{len(r.versions)}", mid) for n, mid in enumerate(r.versions, 1)]


def _chain(replaced_into: dict[int, list[dict]], answer_id: int) -> list[dict]:
    """Every answer a chain of retries replaced, oldest first."""
    found, todo = [], [answer_id]
    while todo:
        for old in replaced_into.get(todo.pop(), []):
            found.append(old)
            todo.append(old["id"])
    return sorted(found, key=lambda m: m["id"])


def summary(lang: str, m: dict) -> str:
    """One line: model · adapter or base · memories · tokens · stopped / cut at the limit."""
    parts = [m.get("model") or "?"]
    v = m.get("adapter_version")
    parts.append(tr(lang, "info_adapter", v=v) if v else tr(lang, "info_base"))
    n = len(m.get("memory_ids") or [])
    parts.append(tr(lang, "info_memory_one") if n == 1 else tr(lang, "info_memories", n=n) if n
                 else tr(lang, "info_no_memories"))
    if m.get("completion_tokens"):
        parts.append(tr(lang, "info_tokens", n=m["completion_tokens"]))
    if m.get("status") == "stopped":
        parts.append("⏹ " + tr(lang, "info_stopped"))
    elif m.get("status") == "error":
        parts.append("⚠️ " + tr(lang, "info_error"))
    elif (m.get("gen_settings") or {}).get("finish_reason") == "length":
        parts.append("✂️ " + tr(lang, "info_length"))
    return " · ".join(parts)


def details(lang: str, m: dict, memories: dict, earlier: list[dict], corrections: dict) -> str:
    body = []
    ids = m.get("memory_ids") or []
    if ids:
        lines = []
        for i in ids:
            mem = memories.get(i)
            lines.append(f"- {_esc(memory_text(lang, mem)[:400])} <em>({mem.created_at[:10]})</em>" if mem
                         else f"- {tr(lang, 'info_memory_gone')}")
        body.append(f"<strong>{tr(lang, 'info_memories_title')}</strong>\n\n" + "\n".join(lines))
    if earlier:
        items = []
        for n, old in enumerate(earlier, 1):
            text = corrections.get(old["id"], old["content"]) or "…"
            items.append(f"<p><strong>{n}/{len(earlier) + 1}</strong> · {_esc(summary(lang, old))}</p>\n\n"
                         f"<blockquote>{_esc(text)}</blockquote>")
        body.append(f"<strong>{tr(lang, 'info_earlier', n=len(earlier))}</strong>\n\n" + "\n\n".join(items))
    inner = "\n\n".join(body)
    return (f'\n\n<details class="turn-info"><summary>ℹ️ {_esc(summary(lang, m))}</summary>\n\n'
            f"{inner}\n\n</details>")


def damage_notice(lang: str, turn) -> str:
    """What a turn met on the way (a damaged personal version, one that could not be downloaded, memories that could
    not be searched), in words."""
    parts = []
    if turn.damaged_version is not None:
        parts.append(tr(lang, "adapter_damaged", v=turn.damaged_version, now=turn.adapter_version)
                     if turn.adapter_version else tr(lang, "adapter_damaged_base", v=turn.damaged_version))
    if getattr(turn, "unavailable_version", None) is not None:
        v = turn.unavailable_version
        parts.append(tr(lang, "adapter_unavailable", v=v, now=turn.adapter_version) if turn.adapter_version
                     else tr(lang, "adapter_unavailable_base", v=v))
    if turn.memory_error:
        parts.append(tr(lang, "memory_unavailable"))
    return " ".join(parts)


def memory_text(lang: str, mem) -> str:
    """A memory as the user reads it: a correction or a liked answer with the question it belongs to."""
    if mem.cue:
        return tr(lang, "mem_answer_text", question=mem.cue[:200], text=mem.text)
    return mem.text


def _esc(text: str) -> str:
    return html.escape(str(text), quote=False)
