"""Secondary tabs of the UI: Compare (base vs personalized, side by side) and Memory.

Each builder adds its components inside the current ``gr.Tabs`` and wires its events; handlers take
the signed-in user from the request's session, like the chat tab. Nothing is filled in until the
user asks, so a fresh page holds nothing of anyone."""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

import gradio as gr
import pandas as pd

from assistant.i18n import tr, tr_error
from storage.errors import AttuneError, InputError

if TYPE_CHECKING:
    from assistant.ui import ChatUI

PRIVATE = {"api_visibility": "private"}
MEMORY_COLUMNS = ("mem_col_id", "mem_col_kind", "mem_col_text", "mem_col_source", "mem_col_date")


def compare_tab(ui: ChatUI, controls: list) -> None:
    t = ui.i18n
    with gr.Tab(t("tab_compare"), id="compare"):
        gr.Markdown(t("compare_intro"))
        question = gr.Textbox(label=t("question"), elem_id="compare-q", lines=2)
        go = gr.Button(t("compare"), variant="primary", elem_id="compare-btn")
        with gr.Row(elem_id="compare-row"):
            with gr.Column(elem_classes="compare-pane"):
                gr.Markdown(t("base_answer"), elem_classes="pane-title")
                base = gr.Markdown("", elem_id="compare-base", container=True, min_height=120)
            with gr.Column(elem_classes="compare-pane"):
                gr.Markdown(t("personal_answer"), elem_classes="pane-title")
                personal = gr.Markdown("", elem_id="compare-personal", container=True, min_height=120)

    def compare(q, temperature, max_new_tokens, top_p, use_adapter, use_memory, request: gr.Request):
        yield from run_compare(ui, request, q, temperature, max_new_tokens, top_p)

    go.click(compare, [question, *controls], [base, personal], **PRIVATE, concurrency_limit=None)


def run_compare(ui: ChatUI, request, question, temperature, max_new_tokens, top_p):
    """Both answers are generated at once (one mixed batch: a base row and the user's adapter row)
    and logged as two conversations marked ``compare`` (hidden from the conversation list)."""
    from assistant.ui_render import summary

    uid, lang = ui.user(request)
    try:
        settings = ui.settings(temperature, max_new_tokens, top_p)
        streams = {
            "base": ui.engine.send(uid, None, question, settings, source="compare", use_adapter=False,
                                   use_memory=False),
            "personal": ui.engine.send(uid, None, question, settings, source="compare"),
        }
        for stream in streams.values():  # commit both questions now, so errors show before any thread starts
            next(stream)
    except AttuneError as e:
        yield "⚠️ " + tr_error(lang, e), ""
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
        yield text["base"] or "…", text["personal"] or "…"
    footer = {}
    for s in text:
        turn = last.get(s)
        row = ui.store.chats.message(uid, turn.assistant_message_id) if turn and turn.assistant_message_id else None
        footer[s] = f"\n\n---\nℹ️ {summary(lang, row)}" if row else ""
    yield text["base"] + footer["base"], text["personal"] + footer["personal"]


# Over 60 lines on purpose: a Gradio tab is its components, handlers (closures over them) and wiring, in that order.
def memory_tab(ui: ChatUI) -> None:
    """List, search and delete the user's memories; remember a fact; forget everything."""
    t = ui.i18n
    with gr.Tab(t("tab_memory"), id="memory") as tab:
        gr.Markdown(t("memory_intro"))
        with gr.Row():
            query = gr.Textbox(label=t("search"), elem_id="memory-search", scale=4)
            refresh = gr.Button(t("search"), elem_id="memory-search-btn", scale=1)
        table = gr.Dataframe(headers=[t(c) for c in MEMORY_COLUMNS], datatype=["number", "str", "str", "str", "str"],
                             interactive=False, elem_id="memory-table", wrap=True)
        with gr.Row():
            mid = gr.Number(value=None, label=t("memory_id"), precision=0, elem_id="memory-id")
            delete = gr.Button(t("delete_memory"), variant="stop", elem_id="memory-delete")
        with gr.Row():
            new_text = gr.Textbox(label=t("edit_memory"), elem_id="memory-edit-text", scale=4)
            edit = gr.Button(t("save_edit"), elem_id="memory-edit", scale=1)
        with gr.Row():
            fact = gr.Textbox(label=t("remember_fact"), elem_id="memory-fact", scale=4)
            add = gr.Button(t("remember"), elem_id="memory-add", scale=1)
        with gr.Row():
            sure = gr.Checkbox(False, label=t("forget_sure"), elem_id="forget-sure")
            forget = gr.Button(t("forget_all"), variant="stop", elem_id="memory-forget")
        status = gr.Markdown("", elem_id="memory-status")

    def rows(q, request: gr.Request):
        uid, lang = ui.user(request)
        data = []
        if ui.engine.memory is not None:
            memories = ui.engine.memory.list(uid, q or None, limit=200)
            origin = ui.engine.memory.sources(uid, [m.id for m in memories])
            data = [[m.id, tr(lang, f"mem_kind_{m.kind}"), m.text, origin.get(m.id, tr(lang, "mem_source_none")),
                     m.created_at[:16].replace("T", " ")] for m in memories]
        return pd.DataFrame(data, columns=[tr(lang, c) for c in MEMORY_COLUMNS])

    def guarded(action):
        def run(q, arg, request: gr.Request):
            uid, lang = ui.user(request)
            if ui.engine.memory is None:
                return rows(q, request), "⚠️ " + tr(lang, "memory_off")
            try:
                message = action(uid, lang, arg)
            except AttuneError as e:
                message = "⚠️ " + tr_error(lang, e)
            return rows(q, request), message
        return run

    def do_delete(uid, lang, memory_id):
        if memory_id is None:
            raise InputError(tr(lang, "memory_enter_id"))
        ui.engine.memory.delete(uid, int(memory_id))
        return tr(lang, "memory_deleted", id=int(memory_id))

    def do_add(uid, lang, text):
        return tr(lang, "remembered" if ui.engine.memory.remember_fact(uid, text) else "already_remembered")

    def do_edit(q, memory_id, text, request: gr.Request):
        uid, lang = ui.user(request)
        if ui.engine.memory is None:
            return rows(q, request), "⚠️ " + tr(lang, "memory_off")
        try:
            if memory_id is None:
                raise InputError(tr(lang, "memory_enter_id_edit"))
            ui.engine.memory.edit(uid, int(memory_id), text)
            message = tr(lang, "memory_edited", id=int(memory_id))
        except AttuneError as e:
            message = "⚠️ " + tr_error(lang, e)
        return rows(q, request), message

    def do_forget(uid, lang, confirmed):
        if not confirmed:
            raise InputError(tr(lang, "forget_confirm"))
        return tr(lang, "forgot", n=ui.engine.memory.forget_all(uid))

    def pick(evt: gr.SelectData):  # clicking a row selects that memory for Delete / Save edit
        row = evt.row_value or []
        return (row[0], row[2]) if len(row) > 2 else (None, "")

    table.select(pick, None, [mid, new_text], **PRIVATE)
    tab.select(rows, [query], [table], **PRIVATE)
    refresh.click(rows, [query], [table], **PRIVATE)
    query.submit(rows, [query], [table], **PRIVATE)
    delete.click(guarded(do_delete), [query, mid], [table, status], **PRIVATE)
    add.click(guarded(do_add), [query, fact], [table, status], **PRIVATE)
    edit.click(do_edit, [query, mid, new_text], [table, status], **PRIVATE)
    forget.click(guarded(do_forget), [query, sure], [table, status], **PRIVATE)
