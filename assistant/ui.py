"""The Gradio chat UI: sign in, conversations, streaming Markdown chat, 👍/👎, corrections, retry.

Every handler takes the signed-in user from server-side session state (``gr.State``), never from
the browser, and passes that user's id to storage, so one session can only touch its own data.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import gradio as gr

from assistant.backend import GenerationSettings
from assistant.engine import ChatEngine, Turn
from assistant.i18n import EN, make_i18n
from assistant.ui_personal import personal_tab
from assistant.ui_tabs import account_tab, compare_tab, memory_tab
from storage.errors import AttuneError

PRIVATE = {"api_visibility": "private"}  # UI events are not a public API (that is /v1)
CSS = "#chatbot {min-height: 55vh} footer {display: none !important}"


@dataclass
class UIConfig:
    """What the chat UI shows and allows."""

    title: str = "Attune"
    """Browser tab title."""
    allow_signup: bool = True
    """Show "Create account" on the sign-in page."""

    def __post_init__(self):
        if not self.title.strip():
            raise ValueError("title: must not be empty")


def theme():
    """System fonts only: no font or script is fetched from outside this server."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


class ChatUI:
    def __init__(self, engine: ChatEngine, config: UIConfig | None = None, runner=None):
        self.engine = engine
        self.runner = runner  # personalize.runner.JobRunner for "Retrain now"; None without a personalizer
        self.store = engine.store
        self.config = config or UIConfig()
        self.i18n = make_i18n()
        self._stops: dict[tuple[int, int | None], threading.Event] = {}

    # rendering -------------------------------------------------------------------------------
    def _history(self, user_id: int, cid: int | None) -> tuple[list[dict], list[int], list[str | None]]:
        """Chat messages for the Chatbot, the message id behind each, and each answer's rating."""
        if cid is None:
            return [], [], []
        msgs = self.store.chats.messages(user_id, cid)
        corrections = self.store.chats.corrections(user_id, cid)
        rated = self.store.chats.ratings(user_id, cid)
        chat, ids, ratings = [], [], []
        for m in msgs:
            if m["role"] == "system":
                continue
            content = corrections.get(m["id"], m["content"])
            if m["role"] == "assistant":
                ratings.append({"like": "Like", "dislike": "Dislike"}.get(rated.get(m["id"])))
                if m["status"] == "stopped":
                    content += " ⏹"
            chat.append({"role": m["role"], "content": content or "…"})
            ids.append(m["id"])
        return chat, ids, ratings

    def _chatbot(self, user_id: int, cid: int | None):
        chat, ids, ratings = self._history(user_id, cid)
        return gr.update(value=chat, feedback_value=ratings), ids

    def _conv_choices(self, user_id: int):
        return [(c["title"] or "…", c["id"]) for c in self.store.chats.conversations(user_id)
                if c["source"] != "compare"]

    @staticmethod
    def _user(session: dict | None) -> dict:
        if not session:
            raise gr.Error(EN["need_sign_in"])
        return session

    # handlers --------------------------------------------------------------------------------
    def sign_in(self, name: str, password: str):
        try:
            user = self.store.users.authenticate(name, password)
        except AttuneError as e:
            return None, gr.update(), gr.update(), f"⚠️ {e}", gr.update(), gr.update(), None, [], ""
        session = {"id": user.id, "name": user.name}
        choices = self._conv_choices(user.id)
        cid = choices[0][1] if choices else None
        chatbot, ids = self._chatbot(user.id, cid)
        return (session, gr.update(visible=False), gr.update(visible=True), "",
                gr.update(choices=choices, value=cid), chatbot, cid, ids, f"**{user.name}**")

    def create_account(self, name: str, password: str):
        if not self.config.allow_signup:
            return None, gr.update(), gr.update(), "⚠️ Sign-up is closed here; ask the admin for an account.", \
                gr.update(), gr.update(), None, [], ""
        try:
            self.store.users.create(name, password)
        except AttuneError as e:
            return None, gr.update(), gr.update(), f"⚠️ {e}", gr.update(), gr.update(), None, [], ""
        return self.sign_in(name, password)

    def sign_out(self, session):
        return None, gr.update(visible=True), gr.update(visible=False), [], None, [], "", ""

    def new_chat(self, session):
        self._user(session)
        return gr.update(value=None), [], None, [], ""

    def select_chat(self, session, cid):
        user = self._user(session)
        try:
            chatbot, ids = self._chatbot(user["id"], cid)
        except AttuneError as e:
            raise gr.Error(str(e)) from None
        return chatbot, cid, ids, ""

    def delete_chat(self, session, cid):
        user = self._user(session)
        if cid is None:
            return gr.update(), gr.update(), None, [], self.i18n("nothing_to_delete")
        try:
            self.store.chats.delete_conversation(user["id"], cid)
        except AttuneError as e:
            raise gr.Error(str(e)) from None
        choices = self._conv_choices(user["id"])
        return gr.update(choices=choices, value=None), [], None, [], self.i18n("deleted")

    def post(self, session, cid, text):
        """Step 1 of a send: commit the user's message, show it, clear the box."""
        user = self._user(session)
        try:
            cid, _ = self.engine.post(user["id"], cid, text)
        except AttuneError as e:
            return gr.update(), gr.update(), cid, gr.update(), gr.update(), f"⚠️ {e}"
        chatbot, ids = self._chatbot(user["id"], cid)
        return "", chatbot, cid, ids, gr.update(choices=self._conv_choices(user["id"]), value=cid), ""

    def respond(self, session, cid, *controls):
        """Step 2: stream the answer to the last user message."""
        yield from self._stream(session, cid, controls, retry=False)

    def retry(self, session, cid, *controls):
        yield from self._stream(session, cid, controls, retry=True)

    def settings(self, temperature, max_new_tokens, top_p) -> GenerationSettings:
        return GenerationSettings.from_request(
            self.engine.config.defaults, temperature=float(temperature), max_new_tokens=int(max_new_tokens),
            top_p=float(top_p))

    def turn_info(self, turn: Turn) -> str:
        """One line under the answer: which adapter answered and which memories it used."""
        who = f"your adapter v{turn.adapter_version}" if turn.adapter_version else "the base model"
        line = f"ℹ️ Answered by {self.engine.backend.name} with {who}."
        hits = getattr(turn, "memories", None) or []
        if hits:
            line += "\n\n**Memories used:**\n" + "\n".join(
                f"- {h.text[:200]} _({h.created_at[:10]})_" for h in hits)
        return line

    def _stream(self, session, cid, sliders, retry: bool):
        user = self._user(session)
        if cid is None:
            return
        chat, ids, _ = self._history(user["id"], cid)
        if not retry and (not chat or chat[-1]["role"] != "user"):
            return  # step 1 refused the message: nothing to answer
        temperature, max_new_tokens, top_p, use_adapter, use_memory = sliders
        try:
            settings = self.settings(temperature, max_new_tokens, top_p)
        except AttuneError as e:
            yield gr.update(), ids, f"⚠️ {e}"
            return
        stop = self._stops[(user["id"], cid)] = threading.Event()
        if retry and chat and chat[-1]["role"] == "assistant":
            chat, ids = chat[:-1], ids[:-1]
        chat.append({"role": "assistant", "content": ""})
        stream = (self.engine.retry if retry else self.engine.answer)(
            user["id"], cid, settings, stop, use_adapter=bool(use_adapter), use_memory=bool(use_memory))
        turn: Turn | None = None
        try:
            for turn in stream:
                chat[-1]["content"] = turn.text
                yield chat, ids, ""
        except AttuneError as e:
            yield gr.update(), ids, f"⚠️ {e}"
            return
        finally:
            self._stops.pop((user["id"], cid), None)
        notice = ""
        if turn is not None:
            notice = self.turn_info(turn)
            if turn.error:
                notice = f"⚠️ {turn.error}"
            elif turn.truncated:
                notice = self.i18n("truncated")
            elif turn.dropped_turns:
                notice = self.i18n("dropped")
        chatbot, ids = self._chatbot(user["id"], cid)
        yield chatbot, ids, notice

    def stop(self, session, cid):
        user = self._user(session)
        event = self._stops.get((user["id"], cid))
        if event:
            event.set()

    def like(self, session, ids, data: gr.LikeData):
        user = self._user(session)
        idx = data.index if isinstance(data.index, int) else data.index[0]
        if not 0 <= idx < len(ids):
            raise gr.Error("That message is no longer shown; reload the conversation.")
        kind = {True: "like", False: "dislike"}.get(data.liked, "clear")
        try:
            self.engine.feedback(user["id"], ids[idx], kind)
        except AttuneError as e:
            raise gr.Error(str(e)) from None

    def edit(self, session, cid, ids, data: gr.EditData):
        user = self._user(session)
        idx = data.index if isinstance(data.index, int) else data.index[0]
        notice = self.i18n("correction_saved")
        try:
            msg = self.store.chats.message(user["id"], ids[idx]) if 0 <= idx < len(ids) else None
            if msg is None or msg["role"] != "assistant":
                notice = self.i18n("only_answers")
            elif data.value.strip() != (data.previous_value or "").strip():
                self.engine.feedback(user["id"], msg["id"], "correction", data.value)
        except AttuneError as e:
            notice = f"⚠️ {e}"
        chatbot, ids = self._chatbot(user["id"], cid)
        return chatbot, ids, notice

    # layout ----------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        t = self.i18n
        defaults = self.engine.config.defaults
        with gr.Blocks(title=self.config.title, analytics_enabled=False) as demo:
            session = gr.State(None)
            cid = gr.State(None)
            ids = gr.State([])

            with gr.Column(visible=True, elem_id="login-col") as login_col:
                gr.Markdown(t("title"))
                gr.Markdown(t("tagline"))
                if self.store.users.count() == 0 and self.config.allow_signup:
                    gr.Markdown(t("first_run"), elem_id="first-run")
                name = gr.Textbox(label=t("username"), elem_id="username", max_lines=1)
                password = gr.Textbox(label=t("password"), type="password", elem_id="password", max_lines=1)
                with gr.Row():
                    signin_btn = gr.Button(t("sign_in"), variant="primary", elem_id="signin-btn")
                    signup_btn = gr.Button(t("create_account"), elem_id="signup-btn",
                                           visible=self.config.allow_signup)
                login_msg = gr.Markdown("", elem_id="login-msg")

            with gr.Column(visible=False, elem_id="app-col") as app_col:
                with gr.Tabs():
                    with gr.Tab(t("tab_chat"), id="chat"):
                        with gr.Row():
                            with gr.Column(scale=1, min_width=220):
                                who = gr.Markdown("", elem_id="who")
                                new_btn = gr.Button(t("new_chat"), size="sm", elem_id="new-btn")
                                conv_list = gr.Radio(label=t("conversations"), choices=[], elem_id="conv-list")
                                del_btn = gr.Button(t("delete_chat"), size="sm", variant="stop", elem_id="del-btn")
                                signout_btn = gr.Button(t("sign_out"), size="sm", elem_id="signout-btn")
                                with gr.Accordion(t("settings"), open=False):
                                    temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05,
                                                            label=t("temperature"))
                                    max_new = gr.Slider(1, 2048, value=defaults.max_new_tokens, step=1,
                                                        label=t("max_new_tokens"))
                                    top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label=t("top_p"))
                                    use_adapter = gr.Checkbox(True, label=t("use_adapter"), elem_id="use-adapter")
                                    use_memory = gr.Checkbox(True, label=t("use_memory"), elem_id="use-memory")
                            with gr.Column(scale=4):
                                chatbot = gr.Chatbot(label=t("assistant"), elem_id="chatbot", editable="all",
                                                     feedback_options=("Like", "Dislike"), render_markdown=True,
                                                     buttons=["copy"])
                                notice = gr.Markdown("", elem_id="notice")
                                with gr.Row():
                                    box = gr.Textbox(label=t("message"), placeholder=t("placeholder"), scale=5,
                                                     elem_id="msg", lines=2, max_lines=12)
                                    with gr.Column(scale=1, min_width=100):
                                        send_btn = gr.Button(t("send"), variant="primary", elem_id="send-btn")
                                        stop_btn = gr.Button(t("stop"), variant="stop", elem_id="stop-btn")
                                gr.Markdown(t("hint"))
                    controls = [temperature, max_new, top_p, use_adapter, use_memory]
                    memory_tab(self, session)
                    personal_tab(self, session)
                    compare_tab(self, session, controls)
                    account_tab(self, session)

            sliders = controls
            signed_in = [session, login_col, app_col, login_msg, conv_list, chatbot, cid, ids, who]
            signin_btn.click(self.sign_in, [name, password], signed_in, **PRIVATE)
            password.submit(self.sign_in, [name, password], signed_in, **PRIVATE)
            signup_btn.click(self.create_account, [name, password], signed_in, **PRIVATE)
            signout_btn.click(self.sign_out, [session],
                              [session, login_col, app_col, chatbot, cid, ids, who, password], **PRIVATE)
            new_btn.click(self.new_chat, [session], [conv_list, chatbot, cid, ids, notice], **PRIVATE)
            conv_list.input(self.select_chat, [session, conv_list], [chatbot, cid, ids, notice], **PRIVATE)
            del_btn.click(self.delete_chat, [session, cid], [conv_list, chatbot, cid, ids, notice], **PRIVATE)
            for trigger in (send_btn.click, box.submit):
                trigger(self.post, [session, cid, box], [box, chatbot, cid, ids, conv_list, notice], **PRIVATE
                        ).then(self.respond, [session, cid, *sliders], [chatbot, ids, notice], **PRIVATE)
            chatbot.retry(self.retry, [session, cid, *sliders], [chatbot, ids, notice], **PRIVATE)
            stop_btn.click(self.stop, [session, cid], None, **PRIVATE)
            chatbot.clear(self.new_chat, [session], [conv_list, chatbot, cid, ids, notice], **PRIVATE)
            chatbot.like(self.like, [session, ids], None, **PRIVATE)
            chatbot.edit(self.edit, [session, cid, ids], [chatbot, ids, notice], **PRIVATE)
        return demo
