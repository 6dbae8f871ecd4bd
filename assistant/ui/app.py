"""The Gradio chat UI: conversations, streaming Markdown chat, 👍/👎, corrections, edits, retry, Stop.

Nothing of a user lives in the page: every page load and every event derives the user from the
request's session cookie on the server (``WebAuth``), and sign-out reloads the page. One answer
streams per user at a time; while it streams, Send becomes Stop and the conversation list is locked.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import gradio as gr

from assistant.chat.service import ChatService, Turn, TurnOptions
from assistant.engines.base import GenerationSettings
from assistant.ui.auth import WebAuth
from assistant.ui.i18n import lang_of, make_i18n, tr, tr_error
from assistant.ui.render import Rendered, damage_notice, render, short_title, strip_info, version_choices
from storage.errors import AttuneError, AuthError

NARROW_PX = 800  # narrower than this (a phone), the sidebar is closed unless opened
STALE_BUSY_S = 30.0  # a send whose answer never started (the tab closed in between) stops blocking
SAME = (gr.update(),) * 7  # the seven controls of ``ChatUI._controls``, unchanged
__all__ = ["ChatUI", "UIConfig"]


@dataclass
class UIConfig:
    """What the chat UI shows and allows."""

    title: str = "Attune"
    """Browser tab title."""
    train_after: int | None = None
    """New answers/ratings that start a background training job (None: the personalizer is not running)."""
    frame_seconds: float = 0.1
    """Shortest time between two updates of a streaming answer on the page (the whole answer so far each time;
    tokens that arrive in between go out with the next one). Every update costs the server a round trip through
    Gradio's queue and the browser a render: one per token held the answer to a fraction of the engine's speed
    (BENCHMARKS.md, "Speed through the API"). 0: every token."""

    def __post_init__(self):
        if not self.title.strip():
            raise ValueError("title: must not be empty")
        if not isinstance(self.frame_seconds, int | float) or not 0 <= self.frame_seconds <= 1:
            raise ValueError(f"frame_seconds: must be a number of seconds from 0 to 1, got {self.frame_seconds!r}")
        if self.train_after is not None and (not isinstance(self.train_after, int) or self.train_after < 1):
            raise ValueError(f"train_after: must be a positive integer or None, got {self.train_after!r}")


@dataclass
class _Busy:
    stop: threading.Event
    since: float
    started: bool = False


class ChatUI:
    def __init__(self, chat: ChatService, auth: WebAuth, config: UIConfig | None = None, runner=None):
        self.chat = chat
        self.auth = auth
        self.runner = runner  # personalize.runner.JobRunner for "Retrain now"; None without a personalizer
        self.store = chat.store
        self.config = config or UIConfig()
        self.i18n = make_i18n()
        self._busy: dict[int, _Busy] = {}
        self._busy_lock = threading.Lock()

    # who is asking ---------------------------------------------------------------------------
    def user(self, request: gr.Request) -> tuple[int, str]:
        """(user id, language) from the request's session; a gr.Error when the session has ended."""
        try:
            return self.auth.require(request).id, lang_of(request)
        except AuthError as e:
            raise gr.Error(str(e)) from None

    # rendering -------------------------------------------------------------------------------
    def _chatbot(self, uid: int, lang: str, cid: int | None, pending: bool = False, version: int | None = None):
        """(Chatbot update, message ids, Rendered); ``version`` picks which answer of the last turn shows."""
        r = render(self.store, self.chat.memory, lang, uid, cid, version)
        chat = r.chat + ([{"role": "assistant", "content": "…"}] if pending else [])
        return gr.update(value=chat, feedback_value=r.ratings), r.ids, r

    def _conv_update(self, uid: int, cid: int | None, interactive: bool = True):
        choices = [(short_title(c["title"]), c["id"]) for c in self.store.chats.conversations(uid)
                   if c["source"] != "compare"]
        return gr.update(choices=choices, value=cid, interactive=interactive)

    def _controls(self, busy: bool, r: Rendered | None = None) -> tuple:
        """Updates for [send, stop, continue, new, delete, rename, versions]: Send turns into Stop while
        streaming; Continue shows for an answer cut at the token limit, and the versions selector ("1/2",
        "2/2") when the last answer was answered again."""
        idle, r = not busy, r or Rendered()
        versions = gr.update(visible=idle and len(r.versions) > 1, choices=version_choices(r),
                             value=r.version if idle else None)
        return (gr.update(visible=idle), gr.update(visible=busy), gr.update(visible=idle and r.last_cut),
                gr.update(interactive=idle), gr.update(interactive=idle), gr.update(interactive=idle), versions)

    # page load and conversations -------------------------------------------------------------
    @staticmethod
    def _sidebar(width) -> dict:
        """On a phone the sidebar starts (and after a pick goes back to) closed, so the chat is visible."""
        return gr.update(open=not width or float(width) >= NARROW_PX)

    def load(self, width, request: gr.Request):
        """Fill the page for the session's user (the page itself is built once, empty, for everyone)."""
        uid, lang = self.user(request)
        user = self.store.users.by_id(uid)
        convs = [c for c in self.store.chats.conversations(uid) if c["source"] != "compare"]
        cid = convs[0]["id"] if convs else None
        chatbot, ids, r = self._chatbot(uid, lang, cid)
        return (f"**{user.name}**", self._conv_update(uid, cid), chatbot, cid, ids, "",
                *self._controls(False, r), self._sidebar(width))

    def new_chat(self, width, request: gr.Request):
        uid, _ = self.user(request)
        return self._conv_update(uid, None), gr.update(value=[], feedback_value=[]), None, [], "", \
            *self._controls(False), self._sidebar(width)

    def select_chat(self, cid, width, request: gr.Request):
        uid, lang = self.user(request)
        self._stop_user(uid)  # never keep streaming into a conversation nobody is looking at
        try:
            chatbot, ids, r = self._chatbot(uid, lang, cid)
        except AttuneError as e:
            return gr.update(), gr.update(), gr.update(), tr_error(lang, e), *self._controls(False), gr.update()
        return chatbot, cid, ids, "", *self._controls(False, r), self._sidebar(width)

    def show_version(self, cid, version, request: gr.Request):
        """The versions selector: show that answer of the last turn (its rating, correction and details
        go with it). Outputs [chatbot, ids, notice, *controls]."""
        uid, lang = self.user(request)
        try:
            chatbot, ids, r = self._chatbot(uid, lang, cid, version=version)
        except AttuneError as e:
            return gr.update(), gr.update(), tr_error(lang, e), *SAME
        return chatbot, ids, "", *self._controls(False, r)

    def ask_delete(self, cid, request: gr.Request):
        uid, lang = self.user(request)
        if cid is None:
            return gr.update(visible=False), gr.update(), tr(lang, "nothing_to_delete")
        try:
            title = self.store.chats.conversation(uid, cid)["title"]
        except AttuneError as e:
            return gr.update(visible=False), gr.update(), tr_error(lang, e)
        return gr.update(visible=True), f"**{tr(lang, 'delete_confirm', title=short_title(title))}**", ""

    def delete_chat(self, cid, request: gr.Request):
        uid, lang = self.user(request)
        try:
            if cid is not None:
                self.store.chats.delete_conversation(uid, cid)
        except AttuneError as e:
            return gr.update(visible=False), gr.update(), gr.update(), cid, gr.update(), tr_error(lang, e), *SAME
        return (gr.update(visible=False), self._conv_update(uid, None), gr.update(value=[], feedback_value=[]),
                None, [], tr(lang, "deleted"), *self._controls(False))

    def rename_chat(self, cid, title, request: gr.Request):
        uid, lang = self.user(request)
        if cid is None:
            return gr.update(), gr.update(), tr(lang, "pick_conversation")
        try:
            self.store.chats.rename_conversation(uid, cid, title)
        except AttuneError as e:
            return gr.update(), gr.update(), tr_error(lang, e)
        return self._conv_update(uid, cid), gr.update(value="", visible=False), tr(lang, "renamed")

    # sending: step 1 commits (or refuses), step 2 streams, step 3 unlocks ----------------------
    def _claim(self, uid: int) -> threading.Event | None:
        """Mark the user busy; None if an answer of theirs is still being written."""
        with self._busy_lock:
            busy = self._busy.get(uid)
            if busy and (busy.started or time.monotonic() - busy.since < STALE_BUSY_S):
                return None
            self._busy[uid] = _Busy(threading.Event(), time.monotonic())
            return self._busy[uid].stop

    def _release(self, uid: int, busy: _Busy | None = None) -> None:
        """Drop the user's claim (only ``busy``, when given: not a newer claim that replaced it)."""
        with self._busy_lock:
            if busy is None or self._busy.get(uid) is busy:
                self._busy.pop(uid, None)

    def _stop_user(self, uid: int) -> None:
        with self._busy_lock:
            busy = self._busy.get(uid)
        if busy:
            busy.stop.set()

    def _refused(self, message: str):
        """Step 1's answer when nothing is sent: the chat view stays as it is, the notice explains."""
        return gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), message, "", *SAME

    def post(self, cid, text, request: gr.Request):
        """Commit the user's message and show it.
        Outputs [box, chatbot, cid, ids, conv_list, notice, mode, *controls]."""
        uid, lang = self.user(request)
        if self._claim(uid) is None:
            return self._refused(tr(lang, "busy"))
        try:
            cid, _ = self.chat.post(uid, cid, text)
        except AttuneError as e:
            self._release(uid)
            return self._refused("⚠️ " + tr_error(lang, e))
        chatbot, ids, _ = self._chatbot(uid, lang, cid, pending=True)
        return "", chatbot, cid, ids, self._conv_update(uid, cid, interactive=False), "", "answer", \
            *self._controls(True)

    def begin(self, mode: str):
        """Step 1 of retry / continue: nothing to commit, only claim the user's stream.
        Outputs [conv_list, notice, mode, *controls]."""
        def run(cid, request: gr.Request):
            uid, lang = self.user(request)
            if cid is None:
                return gr.update(), tr(lang, "nothing_to_retry"), "", *SAME
            if self._claim(uid) is None:
                return gr.update(), tr(lang, "busy"), "", *SAME
            return gr.update(interactive=False), "", mode, *self._controls(True)
        return run

    def settings(self, temperature, max_new_tokens, top_p) -> GenerationSettings:
        return GenerationSettings.from_request(
            self.chat.config.defaults, temperature=float(temperature), max_new_tokens=int(max_new_tokens),
            top_p=float(top_p))

    def respond(self, cid, mode, temperature, max_new_tokens, top_p, use_adapter, use_memory,
                request: gr.Request):
        """Step 2: stream the answer; outputs [chatbot, ids, notice]. Without a claimed send, a no-op."""
        uid, lang = self.user(request)
        with self._busy_lock:
            # The claim is taken once: a step chained after an earlier event of this tab (say a correction)
            # reads the mode a later send has just set, and must not answer that send a second time.
            busy = self._busy.get(uid)
            if not mode or cid is None or busy is None or busy.started:
                busy = None
            else:
                busy.started = True
        if busy is None:
            yield gr.update(), gr.update(), gr.update()
            return
        try:
            yield from self._stream(uid, lang, cid, mode, busy.stop, (temperature, max_new_tokens, top_p),
                                    dict(use_adapter=bool(use_adapter), use_memory=bool(use_memory)))
        finally:
            self._release(uid, busy)

    def _stream(self, uid, lang, cid, mode, stop, sliders, switches):
        try:
            settings = self.settings(*sliders)
            r = render(self.store, self.chat.memory, lang, uid, cid)
            chat = list(r.chat)
            if mode in ("retry", "continue") and chat and chat[-1]["role"] == "assistant":
                chat.pop()
            start = {"answer": self.chat.answer, "retry": self.chat.retry,
                     "continue": self.chat.continue_answer}[mode]
            stream = start(uid, cid, TurnOptions(settings, stop, **switches))
            chat.append({"role": "assistant", "content": "…"})
            turn: Turn | None = None
            shown = 0.0
            for turn in stream:
                if time.monotonic() - shown < self.config.frame_seconds:
                    continue  # shown with the next frame, or with the finished answer below
                chat[-1] = {"role": "assistant", "content": turn.text or "…"}
                yield chat, r.ids, ""
                shown = time.monotonic()
        except AttuneError as e:
            chatbot, ids, _ = self._chatbot(uid, lang, cid)
            yield chatbot, ids, "⚠️ " + tr_error(lang, e)
            return
        notice = ""
        if turn is not None:
            if turn.error:
                notice = "⚠️ " + tr(lang, "err_generation", detail=turn.error)
            elif turn.damaged_version is not None or turn.unavailable_version is not None or turn.memory_error:
                notice = "⚠️ " + damage_notice(lang, turn)
            elif turn.truncated:
                notice = tr(lang, "truncated")
            elif turn.dropped_turns:
                notice = tr(lang, "dropped")
        chatbot, ids, _ = self._chatbot(uid, lang, cid)
        yield chatbot, ids, notice

    def idle(self, cid, version, request: gr.Request):
        """Step 3: unlock the controls; Continue shows when the last answer hit the token limit, the versions
        selector when it has earlier versions (still on the one picked, after a correction of it)."""
        uid, lang = self.user(request)
        with self._busy_lock:
            busy = uid in self._busy  # e.g. a refused send while another tab's answer streams
        r = render(self.store, self.chat.memory, lang, uid, cid, version)
        return self._conv_update(uid, cid, interactive=not busy), *self._controls(busy, r)

    def stop(self, request: gr.Request):
        uid, _ = self.user(request)
        self._stop_user(uid)

    # feedback and edits ----------------------------------------------------------------------
    def like(self, ids, data: gr.LikeData, request: gr.Request):
        uid, lang = self.user(request)
        idx = data.index if isinstance(data.index, int) else data.index[0]
        if not 0 <= idx < len(ids):
            raise gr.Error(tr(lang, "no_longer_shown"))
        kind = {True: "like", False: "dislike"}.get(data.liked, "clear")
        try:
            self.chat.feedback(uid, ids[idx], kind)
        except AttuneError as e:
            raise gr.Error(tr_error(lang, e)) from None

    def edit(self, cid, ids, version, data: gr.EditData, request: gr.Request):
        """An edited answer is a correction; an edited question starts a new branch that is answered
        again (the old branch stays in the log). Outputs [chatbot, ids, notice, mode, *controls]."""
        uid, lang = self.user(request)
        idx = data.index if isinstance(data.index, int) else data.index[0]
        new, old = strip_info(data.value).strip(), strip_info(data.previous_value or "").strip()

        def shown():  # the chat as it is now, on the answer version the user is looking at
            return self._chatbot(uid, lang, cid, version=version)[:2]

        try:
            msg = self.store.chats.message(uid, ids[idx]) if 0 <= idx < len(ids) else None
            if msg is None:
                return *shown(), tr(lang, "no_longer_shown"), "", *SAME
            if new == old:
                return *shown(), "", "", *SAME
            if msg["role"] == "assistant":
                self.chat.feedback(uid, msg["id"], "correction", new)
                return *shown(), tr(lang, "correction_saved"), "", *SAME
            if self._claim(uid) is None:
                return *shown(), tr(lang, "busy"), "", *SAME
            try:
                self.chat.edit_question(uid, cid, msg["id"], new)
            except AttuneError:
                self._release(uid)
                raise
            chatbot, ids, _ = self._chatbot(uid, lang, cid, pending=True)
            return chatbot, ids, tr(lang, "question_edited"), "answer", *self._controls(True)
        except AttuneError as e:
            return *shown(), "⚠️ " + tr_error(lang, e), "", *SAME

