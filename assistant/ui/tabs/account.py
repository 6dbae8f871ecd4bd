"""The Account tab: the API's full base URL, named API keys (create, list, revoke), password change,
a download of all of the user's data, and deleting the account. Everything is read for the user of
the request's session when the tab opens; a new key is shown once and never again."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import gradio as gr
import pandas as pd

from assistant.ui.i18n import tr, tr_error
from assistant.ui.render import PRIVATE
from storage.errors import AttuneError

if TYPE_CHECKING:
    from assistant.ui.app import ChatUI

KEY_COLUMNS = ("col_key_name", "col_key_id", "col_key_created")
RELOAD_JS = "() => { window.location.replace('/signin'); }"


def base_url(request) -> str:
    """The /v1 address as this browser reaches the server."""
    url = urlsplit(str(getattr(request, "url", "") or ""))
    host = (getattr(request, "headers", None) or {}).get("host") or url.netloc
    return f"{url.scheme or 'http'}://{host}/v1"


def keys_view(ui: ChatUI, uid: int, lang: str):
    keys = ui.store.users.api_keys(uid)
    table = pd.DataFrame([[k["name"] or "—", k["key_id"], k["created_at"][:16].replace("T", " ")] for k in keys],
                         columns=[tr(lang, c) for c in KEY_COLUMNS])
    choices = [(f"{k['name'] or '—'} ({k['key_id']})", k["key_id"]) for k in keys]
    return table, gr.update(choices=choices, value=None)


# Over 60 lines on purpose: a Gradio tab is its components, handlers (closures over them) and wiring, in that order.
def account_tab(ui: ChatUI) -> None:
    t = ui.i18n
    with gr.Tab(t("tab_account"), id="account") as tab:
        gr.Markdown(t("key_intro"))
        url = gr.Textbox(label=t("base_url"), elem_id="base-url", interactive=False, buttons=["copy"])
        with gr.Row(equal_height=True):
            key_name = gr.Textbox(label=t("key_name"), elem_id="key-name", max_lines=1, scale=3)
            make = gr.Button(t("new_key"), elem_id="new-key-btn", variant="primary", scale=1)
        key = gr.Textbox(label=t("api_key"), elem_id="api-key", interactive=False, buttons=["copy"], visible=False)
        keys = gr.Dataframe(headers=[t(c) for c in KEY_COLUMNS], interactive=False, elem_id="keys", label=t("keys"))
        with gr.Row(equal_height=True):
            pick = gr.Dropdown(label=t("key_to_revoke"), choices=[], elem_id="revoke-pick", scale=3)
            revoke = gr.Button(t("revoke_key"), variant="stop", elem_id="revoke-btn", scale=1)
        key_msg = gr.Markdown("", elem_id="key-msg")
        with gr.Accordion(t("change_password"), open=False, elem_id="password-box"):
            old_pw = gr.Textbox(label=t("current_password"), type="password", elem_id="old-password")
            new_pw = gr.Textbox(label=t("new_password"), type="password", elem_id="new-password")
            again_pw = gr.Textbox(label=t("repeat_password"), type="password", elem_id="again-password")
            change = gr.Button(t("change_password"), elem_id="change-password-btn")
            pw_msg = gr.Markdown("", elem_id="password-msg")
        with gr.Accordion(t("your_data"), open=False, elem_id="data-box"):
            export = gr.HTML("", elem_id="export")
            gr.Markdown(t("delete_account_intro"))
            del_pw = gr.Textbox(label=t("password"), type="password", elem_id="delete-password")
            del_sure = gr.Checkbox(False, label=t("delete_sure"), elem_id="delete-sure")
            del_btn = gr.Button(t("delete_account"), variant="stop", elem_id="delete-account-btn")

    def show(request: gr.Request):
        uid, lang = ui.user(request)
        table, choices = keys_view(ui, uid, lang)
        link = f'<a class="lg secondary" id="export-link" href="/account/export" download>{tr(lang, "export")}</a>'
        return base_url(request), table, choices, link

    def new_key(name, request: gr.Request):
        uid, lang = ui.user(request)
        try:
            secret = ui.store.users.new_api_key(uid, name)
        except AttuneError as e:
            return gr.update(visible=False, value=""), *keys_view(ui, uid, lang), "⚠️ " + tr_error(lang, e), name
        return gr.update(visible=True, value=secret), *keys_view(ui, uid, lang), "", ""

    def revoke_key(key_id, request: gr.Request):
        uid, lang = ui.user(request)
        if not key_id:
            return *keys_view(ui, uid, lang), tr(lang, "pick_key")
        try:
            ui.store.users.revoke_api_key(uid, key_id)
            message = tr(lang, "key_revoked", id=key_id)
        except AttuneError as e:
            message = "⚠️ " + tr_error(lang, e)
        return *keys_view(ui, uid, lang), message

    def change_password(old, new, again, request: gr.Request):
        uid, lang = ui.user(request)
        if new != again:
            return tr(lang, "passwords_differ"), gr.update(), gr.update(), gr.update()
        try:
            ui.store.users.change_password(uid, old, new)
        except AttuneError as e:
            return "⚠️ " + tr_error(lang, e), gr.update(), gr.update(), gr.update()
        ui.store.sessions.revoke_all(uid, keep=ui.auth.token(request))
        return "✅ " + tr(lang, "password_changed"), "", "", ""

    def delete_account(password, sure, request: gr.Request):
        """Everything of the user goes (rows, vectors, adapters, sessions); then the page reloads."""
        from assistant.chat.account import forget_user

        uid, lang = ui.user(request)
        user = ui.store.users.by_id(uid)
        try:
            if not sure:
                raise gr.Error(tr(lang, "delete_need_confirm"))
            ui.store.users.authenticate(user.name, password)
        except AttuneError as e:
            raise gr.Error(tr_error(lang, e)) from None
        ui._stop_user(uid)
        forget_user(ui.store, uid, ui.chat.memory)

    tab.select(show, None, [url, keys, pick, export], **PRIVATE)
    make.click(new_key, [key_name], [key, keys, pick, key_msg, key_name], **PRIVATE)
    revoke.click(revoke_key, [pick], [keys, pick, key_msg], **PRIVATE)
    change.click(change_password, [old_pw, new_pw, again_pw], [pw_msg, old_pw, new_pw, again_pw], **PRIVATE)
    del_btn.click(delete_account, [del_pw, del_sure], None, **PRIVATE).success(None, js=RELOAD_JS)
