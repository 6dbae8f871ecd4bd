"""Secondary tabs of the UI: Compare (base vs personalized, side by side) and Account (API keys).

Each builder adds its components inside the current ``gr.Tabs`` and wires its events; handlers take
the signed-in user from the server-side session state, like the chat tab."""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

import gradio as gr

from storage.errors import AttuneError

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
