"""The Memory tab: list and search the user's memories; click one to see it with Save edit and Delete right
there (Delete asks first); remember a fact; forget everything (behind a tick box).

Handlers take the signed-in user from the request's session, like the chat tab; the picked memory lives
in a per-page ``gr.State``, and nothing is filled in until the tab is opened."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr
import pandas as pd

from assistant.ui.i18n import tr, tr_error
from assistant.ui.render import PRIVATE, memory_text
from storage.errors import AttuneError, InputError

if TYPE_CHECKING:
    from assistant.ui.app import ChatUI

MEMORY_COLUMNS = ("mem_col_id", "mem_col_kind", "mem_col_text", "mem_col_source", "mem_col_date")
HIDE = gr.update(visible=False)


def memory_tab(ui: ChatUI) -> None:
    MemoryTab(ui).wire()


class MemoryTab:
    """Components in reading order; each handler returns updates for the outputs ``wire`` names."""

    def __init__(self, ui: ChatUI):
        self.ui = ui
        t = ui.i18n
        with gr.Tab(t("tab_memory"), id="memory") as self.tab:
            gr.Markdown(t("memory_intro"))
            with gr.Row():
                self.query = gr.Textbox(label=t("search"), elem_id="memory-search", scale=4)
                self.refresh = gr.Button(t("search"), elem_id="memory-search-btn", scale=1)
            self.table = gr.Dataframe(headers=[t(c) for c in MEMORY_COLUMNS], interactive=False, wrap=True,
                                      datatype=["number", "str", "str", "str", "str"], elem_id="memory-table")
            gr.Markdown(t("memory_click_hint"), elem_id="memory-hint")
            self.picked = gr.State(None)  # the id of the memory clicked in the table
            with gr.Group(visible=False, elem_id="memory-selected") as self.panel:
                self.about = gr.Markdown("", elem_id="memory-about")
                self.text = gr.Textbox(label=t("edit_memory"), elem_id="memory-edit-text", lines=2)
                with gr.Row():
                    self.edit = gr.Button(t("save_edit"), elem_id="memory-edit")
                    self.delete = gr.Button(t("delete_memory"), variant="stop", elem_id="memory-delete")
            with gr.Group(visible=False, elem_id="memory-confirm") as self.confirm:
                self.confirm_text = gr.Markdown("", elem_id="memory-confirm-text")
                with gr.Row():
                    self.yes = gr.Button(t("memory_delete_yes"), variant="stop", elem_id="memory-delete-yes")
                    self.no = gr.Button(t("cancel"), elem_id="memory-delete-no")
            with gr.Row():
                self.fact = gr.Textbox(label=t("remember_fact"), elem_id="memory-fact", scale=4)
                self.add = gr.Button(t("remember"), elem_id="memory-add", scale=1)
            with gr.Row():
                self.sure = gr.Checkbox(False, label=t("forget_sure"), elem_id="forget-sure")
                self.forget = gr.Button(t("forget_all"), variant="stop", elem_id="memory-forget")
            self.status = gr.Markdown("", elem_id="memory-status")

    def wire(self) -> None:
        listing, after = [self.query], [self.table, self.status, self.picked, self.panel, self.confirm]
        self.tab.select(self.rows, listing, [self.table], **PRIVATE)
        self.refresh.click(self.rows, listing, [self.table], **PRIVATE)
        self.query.submit(self.rows, listing, [self.table], **PRIVATE)
        self.table.select(self.pick, None, [self.picked, self.about, self.text, self.panel, self.confirm, self.status],
                          **PRIVATE)
        self.delete.click(self.ask_delete, [self.picked], [self.confirm, self.confirm_text], **PRIVATE)
        self.no.click(lambda: HIDE, None, [self.confirm], **PRIVATE)
        self.yes.click(self.do_delete, [self.query, self.picked], after, **PRIVATE)
        self.edit.click(self.do_edit, [self.query, self.picked, self.text], after, **PRIVATE)
        self.add.click(self.do_add, [self.query, self.fact], after, **PRIVATE)
        self.forget.click(self.do_forget, [self.query, self.sure], after, **PRIVATE)

    # reading ---------------------------------------------------------------------------------
    def rows(self, q, request: gr.Request):
        uid, lang = self.ui.user(request)
        memory, data = self.ui.chat.memory, []
        if memory is not None:
            memories = memory.list(uid, q or None, limit=200)
            origin = memory.sources(uid, [m.id for m in memories])
            data = [[m.id, _kind(lang, m), memory_text(lang, m), origin.get(m.id, tr(lang, "mem_source_none")),
                     m.created_at[:16].replace("T", " ")] for m in memories]
        return pd.DataFrame(data, columns=[tr(lang, c) for c in MEMORY_COLUMNS])

    def pick(self, evt: gr.SelectData, request: gr.Request):
        """A click on a row: that memory, its text to edit, and its Save edit / Delete buttons."""
        uid, lang = self.ui.user(request)
        row = evt.row_value or []
        if len(row) < 5 or row[0] in (None, "") or self.ui.chat.memory is None:
            return None, "", "", HIDE, HIDE, ""
        found = self.ui.chat.memory.used(uid, [int(row[0])])  # the user's own row, read again
        if not found:
            return None, "", "", HIDE, HIDE, ""
        about = tr(lang, "memory_picked", id=found[0].id, kind=row[1], source=row[3], date=row[4])
        return found[0].id, about, found[0].text, gr.update(visible=True), HIDE, ""

    def ask_delete(self, memory_id, request: gr.Request):
        uid, lang = self.ui.user(request)
        if memory_id is None or self.ui.chat.memory is None:
            return HIDE, ""
        found = self.ui.chat.memory.used(uid, [int(memory_id)])
        if not found:
            return HIDE, ""
        return gr.update(visible=True), tr(lang, "memory_delete_confirm", id=found[0].id, text=found[0].text[:200])

    # changing --------------------------------------------------------------------------------
    def _run(self, q, request, action):
        """Run ``action(uid, lang)`` -> message; then the table, the message, and the selection cleared."""
        uid, lang = self.ui.user(request)
        if self.ui.chat.memory is None:
            return self.rows(q, request), "⚠️ " + tr(lang, "memory_off"), None, HIDE, HIDE
        try:
            message = action(uid, lang)
        except AttuneError as e:
            return self.rows(q, request), "⚠️ " + tr_error(lang, e), gr.update(), gr.update(), HIDE
        return self.rows(q, request), message, None, HIDE, HIDE

    def do_delete(self, q, memory_id, request: gr.Request):
        def action(uid, lang):
            if memory_id is None:
                raise InputError(tr(lang, "memory_pick_first"))
            self.ui.chat.memory.delete(uid, int(memory_id))
            return tr(lang, "memory_deleted", id=int(memory_id))
        return self._run(q, request, action)

    def do_edit(self, q, memory_id, text, request: gr.Request):
        def action(uid, lang):
            if memory_id is None:
                raise InputError(tr(lang, "memory_pick_first"))
            self.ui.chat.memory.edit(uid, int(memory_id), text)
            return tr(lang, "memory_edited", id=int(memory_id))
        return self._run(q, request, action)

    def do_add(self, q, text, request: gr.Request):
        def action(uid, lang):
            return tr(lang, "remembered" if self.ui.chat.memory.remember_fact(uid, text) else "already_remembered")
        return self._run(q, request, action)

    def do_forget(self, q, confirmed, request: gr.Request):
        def action(uid, lang):
            if not confirmed:
                raise InputError(tr(lang, "forget_confirm"))
            return tr(lang, "forgot", n=self.ui.chat.memory.forget_all(uid))
        return self._run(q, request, action)


def _kind(lang: str, m) -> str:
    """The kind column: who said it, and whether a newer memory of the same topic replaced it."""
    kind = tr(lang, f"mem_kind_{m.kind}")
    return f"{kind} · {tr(lang, 'mem_replaced', id=m.replaced_by)}" if m.replaced_by else kind
