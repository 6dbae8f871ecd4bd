"""Secondary tabs of the UI: Compare (base vs personalized, side by side) and Account (API keys).

Each builder adds its components inside the current ``gr.Tabs`` and wires its events; handlers take
the signed-in user from the server-side session state, like the chat tab."""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

import gradio as gr

from storage.errors import AttuneError, InputError

if TYPE_CHECKING:
    from assistant.ui import ChatUI

PRIVATE = {"api_visibility": "private"}


def compare_tab(ui: ChatUI, session: gr.State, controls: list) -> None:
    t = ui.i18n
    with gr.Tab(t("tab_compare"), id="compare"):
        gr.Markdown(t("compare_intro"))
        question = gr.Textbox(label=t("question"), elem_id="compare-q", lines=2)
        go = gr.Button(t("compare"), variant="primary", elem_id="compare-btn")
        with gr.Row():
            base = gr.Markdown(label=t("base_answer"), elem_id="compare-base", container=True)
            personal = gr.Markdown(label=t("personal_answer"), elem_id="compare-personal", container=True)

    def compare(s, q, *c):
        yield from run_compare(ui, s, q, *c)

    go.click(compare, [session, question, *controls], [base, personal], **PRIVATE)


def run_compare(ui: ChatUI, session, question, temperature, max_new_tokens, top_p, *_):
    """Both answers are generated at once (one mixed batch: a base row and the user's adapter row)
    and logged as two conversations marked ``compare`` (hidden from the conversation list)."""
    user = ui._user(session)
    try:
        settings = ui.settings(temperature, max_new_tokens, top_p)
        streams = {
            "base": ui.engine.send(user["id"], None, question, settings, source="compare", use_adapter=False,
                                   use_memory=False),
            "personal": ui.engine.send(user["id"], None, question, settings, source="compare"),
        }
    except AttuneError as e:
        yield f"⚠️ {e}", ""
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
            text[side] = f"⚠️ {err}"
        else:
            running -= 1
        yield text["base"] or "…", text["personal"] or "…"
    footer = {s: f"\n\n---\n{ui.turn_info(last[s])}" if s in last else "" for s in text}
    yield text["base"] + footer["base"], text["personal"] + footer["personal"]


def account_tab(ui: ChatUI, session: gr.State) -> None:
    t = ui.i18n
    with gr.Tab(t("tab_account"), id="account"):
        gr.Markdown(t("key_intro"))
        make = gr.Button(t("new_key"), elem_id="new-key-btn")
        key = gr.Textbox(label="API key", elem_id="api-key", interactive=False, buttons=["copy"])

    def new_key(s):
        user = ui._user(s)
        return ui.store.users.new_api_key(user["id"])

    make.click(new_key, [session], [key], **PRIVATE)


def memory_tab(ui: ChatUI, session: gr.State) -> None:
    """List, search and delete the user's memories; remember a fact; forget everything."""
    t = ui.i18n
    with gr.Tab(t("tab_memory"), id="memory") as tab:
        gr.Markdown(t("memory_intro"))
        with gr.Row():
            query = gr.Textbox(label=t("search"), elem_id="memory-search", scale=4)
            refresh = gr.Button(t("search"), elem_id="memory-search-btn", scale=1)
        table = gr.Dataframe(headers=[t(f"mem_col_{c}") for c in ("id", "kind", "text", "source", "date")],
                             datatype=["number", "str", "str", "str", "str"], interactive=False,
                             elem_id="memory-table", wrap=True)
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

    def rows(s, q):
        user = ui._user(s)
        if ui.engine.memory is None:
            return []
        memories = ui.engine.memory.list(user["id"], q or None, limit=200)
        origin = ui.engine.memory.sources(user["id"], [m.id for m in memories])
        return [[m.id, t(f"mem_kind_{m.kind}"), m.text, origin.get(m.id, t("mem_source_none")),
                 m.created_at[:16].replace("T", " ")] for m in memories]

    def guarded(action):
        def run(s, q, *args):
            user = ui._user(s)
            if ui.engine.memory is None:
                return rows(s, q), "⚠️ Memory is off on this server."
            try:
                message = action(user["id"], *args)
            except AttuneError as e:
                message = f"⚠️ {e}"
            return rows(s, q), message
        return run

    def do_delete(uid, memory_id):
        if memory_id is None:
            raise InputError("Enter the id of the memory to delete (first column).")
        ui.engine.memory.delete(uid, int(memory_id))
        return f"Memory {int(memory_id)} deleted: it will not be used again."

    def do_edit(uid, memory_id, text):
        if memory_id is None:
            raise InputError("Enter the id of the memory to edit (first column), then its new text.")
        new = ui.engine.memory.edit(uid, int(memory_id), text)
        return f"Memory {int(memory_id)} replaced" + (f" by memory {new}." if new else " (already remembered).")

    def do_add(uid, text):
        return "Remembered." if ui.engine.memory.remember_fact(uid, text) else "Already remembered."

    def do_forget(uid, confirmed):
        if not confirmed:
            raise InputError("Tick the box to confirm: this deletes every memory.")
        return f"Forgot {ui.engine.memory.forget_all(uid)} memories."

    def pick(evt: gr.SelectData):  # clicking a row selects that memory for Delete / Save edit
        row = evt.row_value or []
        return (row[0], row[2]) if len(row) > 2 else (None, "")

    table.select(pick, None, [mid, new_text], **PRIVATE)
    tab.select(rows, [session, query], [table], **PRIVATE)
    refresh.click(rows, [session, query], [table], **PRIVATE)
    query.submit(rows, [session, query], [table], **PRIVATE)
    delete.click(guarded(do_delete), [session, query, mid], [table, status], **PRIVATE)
    add.click(guarded(do_add), [session, query, fact], [table, status], **PRIVATE)
    edit.click(guarded(do_edit), [session, query, mid, new_text], [table, status], **PRIVATE)
    forget.click(guarded(do_forget), [session, query, sure], [table, status], **PRIVATE)
