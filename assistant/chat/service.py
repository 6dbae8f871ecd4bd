"""ChatService: one chat turn end to end — store the user's message, build the prompt with the
model's chat template inside the context budget, stream the answer, store it with its metadata.

A turn is answered whatever is damaged on disk: an active adapter whose files are damaged is marked so and the
previous version (or the base model) answers (``assistant.chat.adapters.fall_back``), memories that cannot be
searched leave the turn without memories; either way ``Turn.notice`` says so."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from assistant.chat.adapters import fall_back, held_fallback, ready, resolve_adapter
from assistant.engines.base import AdapterRef, ChatBackend, GenerationSettings, StreamStats
from assistant.errors import AdapterDamaged, AdapterUnavailable
from assistant.memory.text import with_facts
from assistant.model import render_chat
from storage.chats import clean_text, storable
from storage.db import Store
from storage.errors import CLI, AttuneError, InputError

log = logging.getLogger("attune.engine")
DEFAULT_SYSTEM_PROMPT = "You are Attune, a helpful personal assistant. Answer clearly and concisely."
OMITTED = "\n\n[… {n:,} characters omitted to fit the model's context …]\n\n"
MAX_FALLBACKS = 8
"""Damaged versions one turn steps back over before it answers with the base model."""


@dataclass
class ChatConfig:
    """How ChatService builds prompts."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """The system message at the top of every prompt."""
    context_tokens: int = 2048
    """Prompt + answer budget in tokens (capped by the model's own limit); oldest turns are dropped first."""
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    """Generation settings used where a request sets none."""

    def __post_init__(self):
        if not isinstance(self.system_prompt, str):
            raise ValueError("system_prompt: must be a string")
        if not isinstance(self.context_tokens, int) or self.context_tokens < 64:
            raise ValueError(f"context_tokens: must be an integer of at least 64, got {self.context_tokens!r}")


@dataclass
class TurnOptions:
    """How one turn is answered; every way of starting one (send, answer, retry, continue) takes these."""

    settings: GenerationSettings | None = None
    """Generation settings; None: ``ChatConfig.defaults``."""
    stop: threading.Event | None = None
    """Set it to end the answer early (stored as stopped, with what it has so far)."""
    source: str = "ui"
    """Where the turn comes from, logged with its messages (``ui``, ``api``, ``compare``)."""
    use_adapter: bool = True
    """False: the base model answers, whatever the user's personal version."""
    use_memory: bool = True
    """False: no memories are looked up for this turn."""

    def __post_init__(self):
        if self.settings is not None and not isinstance(self.settings, GenerationSettings):
            raise ValueError(f"settings: must be GenerationSettings or None, got {type(self.settings).__name__}")
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"source: must be a non-empty string, got {self.source!r}")


@dataclass
class Turn:
    """What one turn produced; ``text`` grows while streaming, ids are set once stored."""

    conversation_id: int
    user_message_id: int | None = None
    assistant_message_id: int | None = None
    text: str = ""
    status: str = "streaming"
    truncated: bool = False
    dropped_turns: int = 0
    adapter_version: int | None = None
    memory_ids: list[int] = field(default_factory=list)
    memories: list = field(default_factory=list)  # the retrieved memory hits (text, date, score)
    stats: StreamStats = field(default_factory=StreamStats)
    error: str | None = None
    use_adapter: bool = True
    use_memory: bool = True
    replaces: int | None = None  # the answer a retry / continue replaces, marked so with this one's insert
    damaged_version: int | None = None
    """The user's version found damaged during this turn (``adapter_version`` answered instead)..."""
    damaged_what: str = ""
    """... and what is wrong with its files."""
    unavailable_version: int | None = None
    """The user's version that could not be downloaded from the adapter store for this turn..."""
    unavailable_what: str = ""
    """... and why (the next turn tries again)."""
    memory_error: str | None = None
    """Why this turn's memories could not be searched (it was answered without them)."""

    @property
    def notice(self) -> str | None:
        """What the user should know about how this turn was answered, in English (the UI translates the fields)."""
        parts = []
        if self.damaged_version is not None:
            now = f"version {self.adapter_version}" if self.adapter_version else "the base model"
            parts.append(f"Your personal version {self.damaged_version} is damaged on disk ({self.damaged_what}), "
                         f"so {now} answered and answers from now on. Train a new version to replace it.")
        if self.unavailable_version is not None:
            now = f"version {self.adapter_version}" if self.adapter_version else "the base model"
            parts.append(f"Your personal version {self.unavailable_version} could not be downloaded from the adapter "
                         f"store ({self.unavailable_what}), so {now} answered this time; it is tried again on your "
                         "next turn.")
        if self.memory_error:
            parts.append(f"Your memories could not be searched for this answer ({self.memory_error}); it was "
                         f"answered without them. If this goes on, rebuild them: {CLI} memory rebuild NAME")
        return " ".join(parts) or None


class ChatService:
    def __init__(self, store: Store, backend: ChatBackend, config: ChatConfig | None = None, memory=None):
        self.store = store
        self.backend = backend
        self.config = config or ChatConfig()
        self.memory = memory  # assistant.memory.service.MemoryService, or None for no personal memory
        self.budget = min(self.config.context_tokens, backend.context_tokens)
        self._inflight: dict[int, tuple] = {}  # answers being generated: stored by shutdown() if need be
        self._store_lock = threading.Lock()

    def shutdown(self, wait: float = 2.0) -> None:
        """Stop generating, and store every answer still in flight (as stopped) so none is lost even if
        the code consuming its stream never runs again (the server is going away)."""
        self.backend.cancel_all()
        deadline = time.monotonic() + wait
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        for user_id, turn, settings, source in list(self._inflight.values()):
            if turn.status == "streaming":
                turn.status = "stopped"
            self._store_once(user_id, turn, settings, source)

    # public API --------------------------------------------------------------------------------
    def post(self, user_id: int, conversation_id: int | None, text, source: str = "ui") -> tuple[int, int]:
        """Validate and commit the user's message (creating the conversation if needed): (conversation, message)."""
        text = clean_text(text)
        if conversation_id is None:
            conversation_id = self.store.chats.create_conversation(user_id, title=text, source=source)
        return conversation_id, self.store.chats.add_message(user_id, conversation_id, "user", text, source=source)

    def post_messages(self, user_id: int, conversation_id: int | None, messages: list[dict],
                      source: str = "api") -> int:
        """Log a client's message list before its answer (an API client sends the whole conversation each time):
        into a new conversation every message, into an existing one (the user's own, else NotFound) only the
        last, the one to answer. Returns the conversation id."""
        chats = self.store.chats
        if conversation_id is not None:
            chats.conversation(user_id, conversation_id)  # NotFound for someone else's id
            self.post(user_id, conversation_id, messages[-1]["content"], source=source)
            return conversation_id
        *earlier, last = messages
        conversation_id = chats.create_conversation(user_id, title=last["content"], source=source)
        for m in earlier:
            if m["content"].strip():
                chats.add_message(user_id, conversation_id, m["role"], m["content"], source=source)
        self.post(user_id, conversation_id, last["content"], source=source)
        return conversation_id

    def answer(self, user_id: int, conversation_id: int, options: TurnOptions | None = None) -> Iterator[Turn]:
        """Stream an answer to the conversation's last user message and store it.

        Yields the same ``Turn`` after every new piece of text; its last state has the stored ids.
        """
        history = self.store.chats.messages(user_id, conversation_id)
        if not history or history[-1]["role"] != "user":
            raise InputError("The conversation has no new message to answer; send one first.")
        turn = Turn(conversation_id=conversation_id, user_message_id=history[-1]["id"])
        yield from self._turn(user_id, turn, options, history)

    def send(self, user_id: int, conversation_id: int | None, text,
             options: TurnOptions | None = None) -> Iterator[Turn]:
        """``post`` then ``answer``: the user's message is committed before the first token."""
        options = options or TurnOptions()
        conversation_id, message_id = self.post(user_id, conversation_id, text, options.source)
        turn = Turn(conversation_id=conversation_id, user_message_id=message_id)
        yield turn
        yield from self._turn(user_id, turn, options)

    def retry(self, user_id: int, conversation_id: int, options: TurnOptions | None = None) -> Iterator[Turn]:
        """Answer the last user message again; the previous answer is kept in the log as replaced."""
        history = self.store.chats.messages(user_id, conversation_id)
        if not history or not any(m["role"] == "user" for m in history):
            raise InputError("There is nothing to retry in this conversation yet.")
        old = history[-1] if history[-1]["role"] == "assistant" else None
        last_user = [m for m in history if m["role"] == "user"][-1]
        turn = Turn(conversation_id=conversation_id, user_message_id=last_user["id"],
                    replaces=old["id"] if old else None)
        yield from self._turn(user_id, turn, options, history, exclude_id=turn.replaces)

    def continue_answer(self, user_id: int, conversation_id: int,
                        options: TurnOptions | None = None) -> Iterator[Turn]:
        """Go on writing the last answer (one cut at the token limit): the longer answer replaces it."""
        history = self.store.chats.messages(user_id, conversation_id)
        if not history or history[-1]["role"] != "assistant" or not history[-1]["content"]:
            raise InputError("Only an answer cut at the token limit can be continued.")
        old = history[-1]
        last_user = [m for m in history if m["role"] == "user"][-1]
        turn = Turn(conversation_id=conversation_id, user_message_id=last_user["id"], replaces=old["id"])
        yield from self._turn(user_id, turn, options, history, exclude_id=old["id"], prefix=old["content"])

    def edit_question(self, user_id: int, conversation_id: int, message_id: int, text) -> int:
        """Replace a question (and everything after it) by an edited one, to be answered next; the old
        branch stays in the log and leaves memory. Returns the new message id."""
        new_id, replaced = self.store.chats.branch(user_id, conversation_id, message_id, text)
        if self.memory is not None:
            for mid in replaced:
                if self.store.chats.message(user_id, mid)["role"] != "assistant":
                    continue
                try:
                    self.memory.remember_turn(user_id, mid)  # a replaced answer is no memory
                except AttuneError as e:
                    log.warning("could not update memory for message %s: %s", mid, e)
        return new_id

    def _personalized(self, user_id: int) -> bool:
        """The user's own switch: personalization off means the base model answers."""
        return self.store.users.by_id(user_id).personalization

    def feedback(self, user_id: int, message_id, kind: str, correction=None, source: str = "ui") -> int:
        """Record 👍/👎/clear or a correction on one of the user's answers; memory follows it."""
        feedback_id = self.store.chats.add_feedback(user_id, message_id, kind, correction, source=source)
        if self.memory is not None:
            self.memory.remember_turn(user_id, int(message_id))
        return feedback_id

    def _remember(self, user_id: int, turn: Turn) -> None:
        """The finished turn becomes memory (the memory service decides what is kept)."""
        if self.memory is not None and turn.assistant_message_id and turn.status == "complete":
            try:
                self.memory.remember_turn(user_id, turn.assistant_message_id)
            except Exception as e:  # the answer is stored; memory can be rebuilt from SQLite later
                log.warning("could not remember message %s: %s", turn.assistant_message_id, e)

    def recall(self, user_id: int, query: str, conversation_id: int | None = None) -> list:
        """The user's memories relevant to ``query``, none from ``conversation_id`` (empty without memory)."""
        if self.memory is None:
            return []
        return self.memory.retrieve(user_id, query, exclude_conversation=conversation_id)

    def build_prompt(self, user_id: int, conversation_id: int, max_new_tokens: int, exclude_id: int | None = None,
                     memory_block: str = "", history: list[dict] | None = None) -> tuple[list[int], Turn]:
        """Token ids of the prompt for the next answer, and a Turn noting what was cut to fit. ``history``: the
        conversation's messages when the caller has read them already (else they are read here)."""
        turn = Turn(conversation_id=conversation_id)
        if history is None:
            history = self.store.chats.messages(user_id, conversation_id)
        corrections = self.store.chats.corrections(user_id, conversation_id)
        msgs = [{"role": m["role"], "content": corrections.get(m["id"], m["content"])}
                for m in history if m["id"] != exclude_id and m["role"] != "system" and
                (m["role"] == "user" or m["content"])]
        while msgs and msgs[-1]["role"] == "assistant":  # answer the last user message
            msgs.pop()
        # A conversation's own system message (e.g. from an API client) replaces the default one.
        own = [m["content"] for m in history if m["role"] == "system"]
        prompt = own[0] if own else self.config.system_prompt
        system = [{"role": "system", "content": prompt}] if prompt else []

        def encode(msgs: list[dict]) -> list[int]:  # the memory block goes with the question it is for
            return self._encode(system + with_facts(msgs, memory_block))

        limit = self.budget - max_new_tokens
        ids = encode(msgs)
        # Drop the oldest exchanges first, always keeping the latest user message.
        while len(ids) > limit and len(msgs) > 1:
            msgs.pop(0)
            while msgs and msgs[0]["role"] != "user" and len(msgs) > 1:
                msgs.pop(0)
            turn.dropped_turns += 1
            ids = encode(msgs)
        original, excess = msgs[-1]["content"], len(ids) - limit
        for _ in range(6):  # the latest message alone is too long: keep its start and its end
            if len(ids) <= limit:
                break
            msgs[-1] = {"role": "user", "content": self._shorten(original, excess)}
            turn.truncated = True
            ids = encode(msgs)
            excess += max(len(ids) - limit, 0) + 16  # re-tokenizing the cut can merge differently
        if len(ids) > limit:
            raise InputError(
                f"The system prompt alone is longer than the context budget ({limit} tokens); shorten it."
            )
        return ids, turn

    # internals ---------------------------------------------------------------------------------
    def _encode(self, messages: list[dict]) -> list[int]:
        return render_chat(self.backend.tokenizer, messages, tokenize=True)

    def _shorten(self, text: str, excess_tokens: int) -> str:
        tok = self.backend.tokenizer
        ids = tok.encode(text, add_special_tokens=False)
        keep = max(len(ids) - excess_tokens - 32, 0)  # 32 tokens of slack for the marker and merges
        head = tok.decode(ids[: keep // 2]) if keep else ""
        tail = tok.decode(ids[len(ids) - keep // 2:]) if keep > 1 else ""
        return head + OMITTED.format(n=len(text) - len(head) - len(tail)) + tail

    def _turn(self, user_id: int, turn: Turn, options: TurnOptions | None, history: list[dict] | None = None,
              exclude_id: int | None = None, prefix: str = "") -> Iterator[Turn]:
        """Answer, then let memory keep the finished turn. The conversation is read once per turn: ``history``
        when the caller has it, else here."""
        if history is None:
            history = self.store.chats.messages(user_id, turn.conversation_id)
        yield from self._answer(user_id, turn, options or TurnOptions(), history, exclude_id, prefix)
        self._remember(user_id, turn)

    def _answer(self, user_id: int, turn: Turn, options: TurnOptions, history: list[dict],
                exclude_id: int | None, prefix: str) -> Iterator[Turn]:
        settings, source = options.settings or self.config.defaults, options.source
        use_adapter, use_memory = options.use_adapter, options.use_memory
        turn.use_adapter, turn.use_memory = use_adapter, use_memory
        stop = options.stop or threading.Event()
        # Reserve room for the answer, but never more than half the context: a long answer limit must not
        # squeeze the prompt to nothing. The answer then gets whatever room the prompt leaves.
        block = ""
        personalized = self._personalized(user_id)  # read once: the whole turn sees one value
        if use_memory and self.memory is not None and personalized:
            block = self._memory_block(user_id, turn, history)
        ids, plan = self.build_prompt(user_id, turn.conversation_id, min(settings.max_new_tokens, self.budget // 2),
                                      exclude_id, block, history)
        if prefix:  # continuing an answer: the model goes on from its own earlier words
            ids = ids + list(self.backend.tokenizer.encode(prefix, add_special_tokens=False))
            turn.text = prefix
            if len(ids) >= self.budget:
                raise InputError("This answer already fills the model's context; ask a follow-up question instead.")
        if len(ids) + settings.max_new_tokens > self.budget:
            settings = replace(settings, max_new_tokens=max(self.budget - len(ids), 1))
        turn.truncated, turn.dropped_turns = plan.truncated, plan.dropped_turns
        self._inflight[id(turn)] = (user_id, turn, settings, source)
        try:
            # The active version is read on every turn: a newly published one answers the next turn.
            adapter = self._adapter(user_id, turn) if use_adapter and personalized else None
            yield from self._generate(user_id, turn, ids, settings, stop, adapter)
            turn.status = "stopped" if turn.stats.finish_reason == "cancelled" else "complete"
        except GeneratorExit:
            turn.status = "stopped"  # the client went away: keep what was generated
            raise
        except AttuneError as e:
            turn.status, turn.error = "error", str(e)
        except Exception as e:  # e.g. out of memory: the user's message is already stored
            turn.status, turn.error = "error", f"Generation failed: {type(e).__name__}: {e}. Try again or shorten it."
        finally:
            self._store_once(user_id, turn, settings, source)
        if turn.status == "error":
            turn.text = turn.text or ""
        yield turn

    def _generate(self, user_id: int, turn: Turn, ids: list[int], settings: GenerationSettings,
                  stop: threading.Event, adapter: AdapterRef | None) -> Iterator[Turn]:
        """Stream the answer into ``turn``. An adapter the engine finds damaged when it loads it (before any text)
        is marked so, and the version that replaces it answers."""
        start, tries = turn.text, 0
        while True:
            try:
                for piece in self.backend.stream(ids, settings, stop, turn.stats, adapter):
                    turn.adapter_version = turn.stats.adapter_version
                    turn.text += storable(piece)  # shown exactly as it is logged (no NUL)
                    yield turn
                turn.adapter_version = turn.stats.adapter_version
                return
            except AdapterDamaged as e:
                if adapter is None or turn.text != start:
                    raise
                tries += 1
                fallback = self._usable(user_id, turn, self._damaged(user_id, turn, e))
                adapter = fallback if tries < MAX_FALLBACKS else None
                turn.stats = StreamStats()
                stop.clear()  # set by the backend as the failed attempt ended (before any text), not by the user

    def _adapter(self, user_id: int, turn: Turn) -> AdapterRef | None:
        """The user's active version if its files are whole (downloaded first if it is kept in the adapter store);
        else (marked damaged) the one that replaces it, or for this turn an older one held here if it cannot be
        downloaded now."""
        return self._usable(user_id, turn, resolve_adapter(self.store, user_id))

    def _usable(self, user_id: int, turn: Turn, ref: AdapterRef | None) -> AdapterRef | None:
        for _ in range(MAX_FALLBACKS):
            if ref is None:
                return None
            try:
                ready(self.store, user_id, ref)
                return ref
            except AdapterDamaged as e:
                ref = self._damaged(user_id, turn, e)
            except AdapterUnavailable as e:
                ref = self._unavailable(user_id, turn, e)
        return None

    def _damaged(self, user_id: int, turn: Turn, error: AdapterDamaged) -> AdapterRef | None:
        ref = fall_back(self.store, user_id, error)
        if turn.damaged_version is None:  # the first one found is the version the user had
            turn.damaged_version, turn.damaged_what = error.version, error.what
        turn.adapter_version = ref.version if ref else None
        return ref

    def _unavailable(self, user_id: int, turn: Turn, error: AdapterUnavailable) -> AdapterRef | None:
        ref = held_fallback(self.store, user_id, error.version)
        if turn.unavailable_version is None:
            turn.unavailable_version, turn.unavailable_what = error.version, error.what
        turn.adapter_version = ref.version if ref else None
        log.warning("user %s: adapter v%s cannot be downloaded now (%s); %s answers this turn", user_id,
                    error.version, error.what, f"v{ref.version}" if ref else "the base model")
        return ref

    def _memory_block(self, user_id: int, turn: Turn, history: list[dict]) -> str:
        """The facts block for this turn's question (fills ``turn.memories``). Memories that cannot be searched
        (say the index cannot be rebuilt) leave this turn without them, with a notice, instead of failing it."""
        query = next((m["content"] for m in history if m["id"] == turn.user_message_id), None)
        if query is None:  # a question is in its conversation's history; should it not be, read it directly
            query = self.store.chats.message(user_id, turn.user_message_id)["content"]
        try:
            turn.memories = self.recall(user_id, query, turn.conversation_id)
        except Exception as e:  # the index is a cache of SQLite: the next turn tries again
            log.exception("user %s: memories could not be searched", user_id)
            turn.memory_error = f"{type(e).__name__}: {e}"
            return ""
        turn.memory_ids = [h.id for h in turn.memories]
        return self.memory.prompt_block(turn.memories)

    def _store_once(self, user_id: int, turn: Turn, settings: GenerationSettings, source: str) -> None:
        with self._store_lock:
            self._inflight.pop(id(turn), None)
            if turn.assistant_message_id is None:
                turn.assistant_message_id = self._store_answer(user_id, turn, settings, source)

    def _store_answer(self, user_id: int, turn: Turn, settings: GenerationSettings, source: str) -> int:
        s = turn.stats
        gen = settings.to_dict() | {"truncated": turn.truncated, "dropped_turns": turn.dropped_turns,
                                    "finish_reason": s.finish_reason, "use_adapter": turn.use_adapter,
                                    "use_memory": turn.use_memory}
        if turn.damaged_version is not None:
            gen["adapter_damaged"] = turn.damaged_version
        if turn.unavailable_version is not None:
            gen["adapter_unavailable"] = turn.unavailable_version
        return self.store.chats.add_message(
            user_id, turn.conversation_id, "assistant", turn.text, status=turn.status, source=source,
            model=self.backend.name, adapter_version=turn.adapter_version, memory_ids=turn.memory_ids,
            gen_settings=gen, prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
            ttft_ms=s.ttft_ms, latency_ms=s.latency_ms, replaces=turn.replaces,
        )
