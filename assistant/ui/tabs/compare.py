"""The Compare tab of the UI: base vs personalized, side by side (the Memory tab is ``tabs.memory``). With no
personal version yet (or learning off) both sides would be the base model: it says so instead of answering.

Each builder adds its components inside the current ``gr.Tabs`` and wires its events; handlers take
the signed-in user from the request's session, like the chat tab. Nothing is filled in until the
user asks, so a fresh page holds nothing of anyone."""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

import gradio as gr

from assistant.chat.service import TurnOptions
from assistant.ui.i18n import tr, tr_error
from assistant.ui.render import PRIVATE
from storage.errors import AttuneError

if TYPE_CHECKING:
    from assistant.ui.app import ChatUI


def compare_tab(ui: ChatUI, controls: list) -> None:
    t = ui.i18n
    with gr.Tab(t("tab_compare"), id="compare"):
        gr.Markdown(t("compare_intro"))
        question = gr.Textbox(label=t("question"), elem_id="compare-q", lines=2)
        go = gr.Button(t("compare"), variant="primary", elem_id="compare-btn")
        note = gr.Markdown("", elem_id="compare-note")
        with gr.Row(elem_id="compare-row"):
            with gr.Column(elem_classes="compare-pane"):
                gr.Markdown(t("base_answer"), elem_classes="pane-title")
                base = gr.Markdown("", elem_id="compare-base", container=True, min_height=120)
            with gr.Column(elem_classes="compare-pane"):
                gr.Markdown(t("personal_answer"), elem_classes="pane-title")
                personal = gr.Markdown("", elem_id="compare-personal", container=True, min_height=120)

    def compare(q, temperature, max_new_tokens, top_p, use_adapter, use_memory, request: gr.Request):
        yield from run_compare(ui, request, q, temperature, max_new_tokens, top_p)

    go.click(compare, [question, *controls], [note, base, personal], **PRIVATE, concurrency_limit=None)


def nothing_to_compare(ui: ChatUI, user_id: int, lang: str) -> str:
    """Why both sides would be the base model (learning off, or no personal version yet); "" when they differ."""
    if not ui.store.users.by_id(user_id).personalization:
        return "ℹ️ " + tr(lang, "compare_off")
    if ui.store.adapters.active_version(user_id) is None:
        return "ℹ️ " + tr(lang, "compare_no_version")
    return ""


def run_compare(ui: ChatUI, request, question, temperature, max_new_tokens, top_p):
    """Both answers are generated at once (one mixed batch: a base row and the user's adapter row)
    and logged as two conversations marked ``compare`` (hidden from the conversation list). Yields
    (note, base pane, personal pane); with nothing to compare, only the note says why."""
    from assistant.ui.render import summary

    uid, lang = ui.user(request)
    missing = nothing_to_compare(ui, uid, lang)
    if missing:
        yield missing, "", ""
        return
    try:
        settings = ui.settings(temperature, max_new_tokens, top_p)
        streams = {
            "base": ui.chat.send(uid, None, question, TurnOptions(settings, source="compare", use_adapter=False,
                                                                 use_memory=False)),
            "personal": ui.chat.send(uid, None, question, TurnOptions(settings, source="compare")),
        }
        for stream in streams.values():  # commit both questions now, so errors show before any thread starts
            next(stream)
    except AttuneError as e:
        yield "", "⚠️ " + tr_error(lang, e), ""
        return
    updates: queue.Queue = queue.Queue()
    text = {"base": "", "personal": ""}

    def pump(side):
        try:
            for turn in streams[side]:
                updates.put((side, turn, None))
        except AttuneError as e:
            updates.put((side, None, e))
        updates.put((side, None, None))

    for side in streams:
        threading.Thread(target=pump, args=(side,), daemon=True).start()
    running, last = 2, {}
    while running:
        side, turn, err = updates.get()
        if turn is not None:
            text[side], last[side] = turn.text, turn
        elif err is not None:
            text[side] = "⚠️ " + tr_error(lang, err)
        else:
            running -= 1
        yield "", text["base"] or "…", text["personal"] or "…"
    footer = {}
    for s in text:
        turn = last.get(s)
        row = ui.store.chats.message(uid, turn.assistant_message_id) if turn and turn.assistant_message_id else None
        footer[s] = f"\n\n---\nℹ️ {summary(lang, row)}" if row else ""
    yield "", text["base"] + footer["base"], text["personal"] + footer["personal"]
