"""The page layout of the UI and its wiring: a collapsible sidebar (who, conversations, settings),
the tabs, the chat composer, and the page's own CSS and JS (Enter sends, Shift+Enter adds a line;
sign-out revokes the session and reloads). The UI's entry point: ``server`` builds the page with
:func:`build_layout` over a ``ChatUI``, whose handlers (and the tab modules') it wires; ``ChatUI`` never imports it."""

from __future__ import annotations

import gradio as gr

from assistant.engines.base import SETTING_RANGES
from assistant.ui.app import ChatUI
from assistant.ui.render import PRIVATE
from assistant.ui.tabs.account import account_tab
from assistant.ui.tabs.compare import compare_tab
from assistant.ui.tabs.memory import memory_tab
from assistant.ui.tabs.personal import personal_tab

STREAMING = {**PRIVATE, "concurrency_limit": None}  # every user's answer streams at once (the backend batches)

CSS = """
footer {display: none !important}
#chatbot {height: calc(100dvh - 300px) !important; min-height: 260px}
#composer {align-items: flex-end; flex-wrap: nowrap; gap: 8px}
#composer > .form, #msg {flex: 1 1 auto; min-width: 0}
#composer button {min-width: 88px; max-width: 120px}
#notice:empty, #notice p:empty {display: none}
#versions {padding: 4px 8px}
#hint {font-size: var(--text-sm); opacity: .75}
.turn-info {margin-top: .6em; font-size: .85em; opacity: .8}
.turn-info summary {cursor: pointer}
table th, table th * {word-break: keep-all !important; overflow-wrap: normal !important; hyphens: none}
#who {margin: 0}
.pane-title {font-weight: 600}
@media (max-width: 720px) {
  #chatbot {height: calc(100dvh - 260px) !important; min-height: 200px}
  #compare-row {flex-direction: column !important}
  #compare-row > * {width: 100% !important; min-width: 0 !important}
  #hint {display: none}
  .tabs button[role="tab"] {padding-left: 8px; padding-right: 8px}
}
"""

# Enter sends, Shift+Enter inserts a line break (an IME composition's Enter is left alone). Runs in the
# capture phase so Gradio's own textbox handler never sees these keys.
JS = """
() => {
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || e.isComposing || e.keyCode === 229) return;
    const t = e.target;
    if (!t || t.tagName !== "TEXTAREA" || !t.closest("#msg")) return;
    e.stopPropagation();
    if (e.shiftKey) return;  // the browser's own line break
    e.preventDefault();
    const send = document.querySelector("#send-btn");
    if (send && send.offsetParent !== null && !send.disabled) send.click();
  }, true);
}
"""

WIDTH_JS = "() => [window.innerWidth]"

SIGN_OUT_JS = """
async () => {
  try { await fetch("/auth/signout", {method: "POST", credentials: "same-origin"}); }
  finally { window.location.replace("/signin"); }
}
"""


def theme():
    """System fonts only: no font or script is fetched from outside this server."""
    return gr.themes.Default(primary_hue="orange", font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


# Over 60 lines on purpose: the page's components in reading order, then their wiring to ChatUI's handlers.
def build_layout(ui: ChatUI) -> gr.Blocks:
    t = ui.i18n
    d = ui.chat.config.defaults
    with gr.Blocks(title=ui.config.title, analytics_enabled=False) as demo:
        cid, ids, mode = gr.State(None), gr.State([]), gr.State("")
        width = gr.Number(None, visible=False)  # the browser window's width, read by the page-load event
        with gr.Sidebar(open=True, width=290, elem_id="sidebar") as sidebar:
            with gr.Row(equal_height=True):
                who = gr.Markdown("", elem_id="who")
                signout_btn = gr.Button(t("sign_out"), size="sm", elem_id="signout-btn", scale=0, min_width=90)
            new_btn = gr.Button(t("new_chat"), variant="primary", size="sm", elem_id="new-btn")
            conv_list = gr.Radio(label=t("conversations"), choices=[], elem_id="conv-list")
            with gr.Row():
                rename_btn = gr.Button(t("rename"), size="sm", elem_id="rename-btn", min_width=60)
                del_btn = gr.Button(t("delete_chat"), size="sm", variant="stop", elem_id="del-btn", min_width=60)
            rename_box = gr.Textbox(label=t("rename_label"), visible=False, max_lines=1, elem_id="rename-box")
            with gr.Group(visible=False, elem_id="delete-confirm") as confirm:
                confirm_text = gr.Markdown("", elem_id="delete-confirm-text")
                with gr.Row():
                    yes_btn = gr.Button(t("delete_yes"), variant="stop", size="sm", elem_id="del-yes")
                    no_btn = gr.Button(t("cancel"), size="sm", elem_id="del-no")
            with gr.Accordion(t("settings"), open=False, elem_id="settings"):
                temperature = gr.Slider(*SETTING_RANGES["temperature"], value=d.temperature, step=0.05,
                                        label=t("temperature"))
                max_new = gr.Slider(*SETTING_RANGES["max_new_tokens"], value=d.max_new_tokens, step=1,
                                    label=t("max_new_tokens"), elem_id="max-new")
                top_p = gr.Slider(SETTING_RANGES["top_p"][0] + 0.05, SETTING_RANGES["top_p"][1], value=d.top_p,
                                  step=0.05, label=t("top_p"))  # top_p's lowest is excluded: one step above it
                use_adapter = gr.Checkbox(True, label=t("use_adapter"), elem_id="use-adapter")
                use_memory = gr.Checkbox(True, label=t("use_memory"), elem_id="use-memory")
        sliders = [temperature, max_new, top_p, use_adapter, use_memory]
        with gr.Tabs():
            with gr.Tab(t("tab_chat"), id="chat"):
                chatbot = gr.Chatbot(label=t("assistant"), show_label=False, elem_id="chatbot", editable="all",
                                     feedback_options=("Like", "Dislike"), render_markdown=True, buttons=["copy"])
                versions = gr.Radio(choices=[], label=t("answer_versions"), visible=False, elem_id="versions")
                notice = gr.Markdown("", elem_id="notice")
                with gr.Row(elem_id="composer"):
                    box = gr.Textbox(label=t("message"), show_label=False, placeholder=t("placeholder"),
                                     elem_id="msg", lines=1, max_lines=8, scale=5, autofocus=True)
                    send_btn = gr.Button(t("send"), variant="primary", elem_id="send-btn", scale=0)
                    stop_btn = gr.Button(t("stop"), variant="stop", elem_id="stop-btn", scale=0, visible=False)
                continue_btn = gr.Button(t("continue"), size="sm", elem_id="continue-btn", visible=False)
                gr.Markdown(t("hint"), elem_id="hint")
            memory_tab(ui)
            personal_tab(ui)
            compare_tab(ui, sliders)
            account_tab(ui)

        controls = [send_btn, stop_btn, continue_btn, new_btn, del_btn, rename_btn, versions]
        view = [chatbot, cid, ids, notice]
        demo.load(ui.load, [width], [who, conv_list, *view, *controls, sidebar], js=WIDTH_JS, **PRIVATE)
        demo.load(None, None, [width], js=WIDTH_JS)
        signout_btn.click(None, js=SIGN_OUT_JS)
        new_btn.click(ui.new_chat, [width], [conv_list, *view, *controls, sidebar], **PRIVATE)
        chatbot.clear(ui.new_chat, [width], [conv_list, *view, *controls, sidebar], **PRIVATE)
        conv_list.input(ui.select_chat, [conv_list, width], [*view, *controls, sidebar], **PRIVATE)
        del_btn.click(ui.ask_delete, [cid], [confirm, confirm_text, notice], **PRIVATE)
        yes_btn.click(ui.delete_chat, [cid], [confirm, conv_list, *view, *controls], **PRIVATE)
        no_btn.click(lambda: gr.update(visible=False), None, [confirm], **PRIVATE)
        rename_btn.click(lambda: gr.update(visible=True, value=""), None, [rename_box], **PRIVATE)
        rename_box.submit(ui.rename_chat, [cid, rename_box], [conv_list, rename_box, notice], **PRIVATE)

        def then_stream(event):
            event.then(ui.respond, [cid, mode, *sliders], [chatbot, ids, notice], **STREAMING
                       ).then(ui.idle, [cid, versions], [conv_list, *controls], **PRIVATE)

        then_stream(send_btn.click(ui.post, [cid, box], [box, chatbot, cid, ids, conv_list, notice, mode, *controls],
                                   **PRIVATE))
        then_stream(chatbot.retry(ui.begin("retry"), [cid], [conv_list, notice, mode, *controls], **PRIVATE))
        then_stream(continue_btn.click(ui.begin("continue"), [cid], [conv_list, notice, mode, *controls],
                                       **PRIVATE))
        then_stream(chatbot.edit(ui.edit, [cid, ids, versions], [chatbot, ids, notice, mode, *controls], **PRIVATE))
        versions.input(ui.show_version, [cid, versions], [chatbot, ids, notice, *controls], **PRIVATE)
        stop_btn.click(ui.stop, None, None, **STREAMING)
        chatbot.like(ui.like, [ids], None, **PRIVATE)
    return demo
