"""assistant/: ChatService. Where the model is the point (streaming, determinism, stop, incremental decoding)
with the tiny random Llama; everything else (turns stored, prompts, context budget, retry, corrections,
scoping) with the scripted FakeBackend of tests/fakes.py, so the assertions are exact."""

import threading

import pytest

from assistant.chat.service import TurnOptions
from assistant.engines.base import GenerationSettings
from fakes import activate_version
from storage import InputError, NotFound


def run(it):
    turn = None
    for turn in it:
        pass
    return turn


def test_turn_is_stored_with_metadata(engine, store, alice):
    stream = engine.send(alice.id, None, "Hello! How can I help you today?")
    first = next(stream)
    # The user's message is committed before the first token is generated.
    assert first.user_message_id and first.assistant_message_id is None and first.text == ""
    assert store.chats.message(alice.id, first.user_message_id)["content"] == "Hello! How can I help you today?"
    last = run(stream)
    msgs = store.chats.messages(alice.id, last.conversation_id)
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    answer = msgs[1]
    assert answer["id"] == last.assistant_message_id and answer["content"] == last.text
    assert answer["status"] == "complete" and answer["model"] and answer["completion_tokens"] > 0
    assert answer["latency_ms"] > 0 and answer["ttft_ms"] is not None and answer["prompt_tokens"] > 0
    assert answer["gen_settings"]["max_new_tokens"] == 16 and answer["memory_ids"] == []
    assert store.chats.conversations(alice.id)[0]["title"] == "Hello! How can I help you today?"


def test_streaming_yields_growing_text(engine, alice):
    texts = [t.text[:] for t in engine.send(alice.id, None, "Tell me about Paris", TurnOptions(GenerationSettings(
        max_new_tokens=24, temperature=0)))]
    assert len(texts) >= 3 and texts[-1].startswith(texts[-2]) and len(texts[-1]) > 0


def test_greedy_is_deterministic_and_settings_are_per_request(engine, alice):
    greedy = GenerationSettings(max_new_tokens=12, temperature=0)
    a = run(engine.send(alice.id, None, "Python is", TurnOptions(greedy))).text
    b = run(engine.send(alice.id, None, "Python is", TurnOptions(greedy))).text
    assert a == b
    short = run(engine.send(alice.id, None, "Python is",
                            TurnOptions(GenerationSettings(max_new_tokens=3, temperature=0))))
    assert short.stats.completion_tokens <= 3 and short.stats.finish_reason == "length"


def test_stop_keeps_the_partial_answer(engine, store, alice):
    stop = threading.Event()
    turn = None
    long = GenerationSettings(max_new_tokens=200, temperature=0)
    for turn in engine.send(alice.id, None, "Hello", TurnOptions(long, stop=stop)):
        if turn.text:
            stop.set()
    assert turn.status == "stopped" and turn.stats.completion_tokens < 200
    assert store.chats.message(alice.id, turn.assistant_message_id)["status"] == "stopped"


# --- the scripted backend: the engine's own behaviour, asserted exactly ------------------------------


def test_scripted_answer_is_streamed_and_stored_exactly(fake_engine, fake, store, alice):
    fake.enqueue(["Hello", " world", "!"])
    turns = [(t.text, t.assistant_message_id) for t in fake_engine.send(alice.id, None, "Hi there")]
    assert turns[0] == ("", None)  # the user's message is committed before the first piece
    assert [text for text, _ in turns[1:-1]] == ["Hello", "Hello world", "Hello world!"]
    last = run(fake_engine.send(alice.id, None, "again"))  # nothing queued: the default answer
    answer = store.chats.message(alice.id, turns[-1][1])
    assert answer["content"] == "Hello world!" and answer["status"] == "complete"
    assert answer["model"] == "fake-model" and answer["completion_tokens"] == 3
    assert answer["prompt_tokens"] == len(fake.calls[0].prompt_ids) and answer["adapter_version"] is None
    assert answer["gen_settings"]["max_new_tokens"] == 16 and answer["gen_settings"]["finish_reason"] == "stop"
    assert last.text == "I am a scripted answer."


def test_a_generated_nul_is_shown_as_it_is_logged(fake_engine, fake, store, alice):
    fake.enqueue(["a\x00", "b"])  # a model can emit NUL, which SQLite text cannot keep: both see U+FFFD
    turns = list(fake_engine.send(alice.id, None, "Hi there"))
    assert turns[-1].text == "a\ufffdb" and not any("\x00" in t.text for t in turns)
    assert store.chats.message(alice.id, turns[-1].assistant_message_id)["content"] == "a\ufffdb"


def test_prompt_has_system_prompt_history_and_ends_ready_for_the_answer(fake_engine, fake, alice):
    fake.enqueue(["Nice name!"])
    first = run(fake_engine.send(alice.id, None, "My dog is called Biscuit."))
    run(fake_engine.send(alice.id, first.conversation_id, "What is his name?"))
    assert fake.prompts[1] == (
        "<|im_start|>system\nYou are Attune, a helpful personal assistant. Answer clearly and concisely.<|im_end|>\n"
        "<|im_start|>user\nMy dog is called Biscuit.<|im_end|>\n<|im_start|>assistant\nNice name!<|im_end|>\n"
        "<|im_start|>user\nWhat is his name?<|im_end|>\n<|im_start|>assistant\n")


def test_adapter_switches_reach_the_backend(fake_engine, fake, store, alice):
    activate_version(store, alice.id, 3)
    on = run(fake_engine.send(alice.id, None, "hi"))
    off = run(fake_engine.send(alice.id, None, "hi", TurnOptions(use_adapter=False)))
    store.users.set_personalization(alice.id, False)
    personal_off = run(fake_engine.send(alice.id, None, "hi"))
    ref = fake.calls[0].adapter  # a reference to the active version, never the user's id
    assert ref.version == 3 and ref.name.startswith(f"u{alice.id}-v3-") and ref.path.endswith(f"u{alice.id}/v3")
    assert [c.adapter for c in fake.calls[1:]] == [None, None]
    assert (on.adapter_version, off.adapter_version, personal_off.adapter_version) == (3, None, None)
    assert store.chats.message(alice.id, on.assistant_message_id)["adapter_version"] == 3


def test_answer_limit_and_stop_end_the_answer(fake_engine, fake, store, alice):
    fake.enqueue(["one", " two", " three", " four"])
    short = run(fake_engine.send(alice.id, None, "count",
                                 TurnOptions(GenerationSettings(max_new_tokens=2, temperature=0))))
    assert short.text == "one two" and short.stats.finish_reason == "length" and short.status == "complete"
    stop = threading.Event()
    fake.enqueue(["a", "b", "c", "d"])
    for turn in fake_engine.send(alice.id, None, "go", TurnOptions(stop=stop)):
        if turn.text == "ab":
            stop.set()
    assert turn.text == "ab" and turn.status == "stopped"
    assert store.chats.message(alice.id, turn.assistant_message_id)["content"] == "ab"


def test_a_backend_error_is_stored_as_an_error_answer(fake_engine, fake, store, alice):
    fake.fail(RuntimeError("out of memory"))
    turn = run(fake_engine.send(alice.id, None, "hi"))
    assert turn.status == "error" and "RuntimeError: out of memory" in turn.error
    assert store.chats.message(alice.id, turn.assistant_message_id)["status"] == "error"


def test_long_conversation_drops_oldest_turns(fake_engine, fake, store, alice):
    cid = store.chats.create_conversation(alice.id)
    for i in range(60):
        store.chats.add_message(alice.id, cid, "user", f"Message number {i} about my dog Biscuit and SQLite.")
        store.chats.add_message(alice.id, cid, "assistant", "Noted, that is very interesting indeed.")
    turn = run(fake_engine.send(alice.id, cid, "And the latest question?"))
    assert turn.status == "complete" and turn.dropped_turns > 0 and not turn.truncated
    assert turn.stats.prompt_tokens <= fake_engine.budget - 16
    prompt = fake.prompts[-1]
    assert "Message number 59 " in prompt and "Message number 0 " not in prompt
    assert prompt.endswith("<|im_start|>user\nAnd the latest question?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.index("<|im_start|>system") == 0  # the system prompt is never dropped


def test_200kb_message_is_stored_whole_and_truncated_for_the_model(fake_engine, fake, store, alice):
    text = "start " + "lorem ipsum dolor " * 11_500 + " end"
    assert len(text) > 200_000
    turn = run(fake_engine.send(alice.id, None, text))
    assert turn.status == "complete" and turn.truncated
    assert store.chats.message(alice.id, turn.user_message_id)["content"] == text
    prompt = fake.prompts[-1]
    assert len(fake.calls[-1].prompt_ids) <= fake_engine.budget - 16
    assert "characters omitted" in prompt and "user\nstart lorem" in prompt and "dolor  end<|im_end|>" in prompt


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_message_is_refused_and_nothing_stored(fake_engine, fake, store, alice, text):
    with pytest.raises(InputError, match="empty"):
        run(fake_engine.send(alice.id, None, text))
    assert store.chats.conversations(alice.id) == [] and fake.calls == []


def test_control_characters_and_emoji(fake_engine, fake, store, alice):
    text = "Hi 🎉🐶 \x07\x1b[2J \u202e reversed 中文 \ud800"
    turn = run(fake_engine.send(alice.id, None, text))
    assert turn.status == "complete"
    stored = text.replace("\ud800", "\ufffd")
    assert store.chats.message(alice.id, turn.user_message_id)["content"] == stored
    assert f"user\n{stored}<|im_end|>" in fake.prompts[-1]


def test_retry_replaces_the_answer_but_keeps_it_in_the_log(fake_engine, fake, store, alice):
    fake.enqueue(["A husky."]).enqueue(["A French bulldog."])
    first = run(fake_engine.send(alice.id, None, "Which breed suits flats?"))
    again = run(fake_engine.retry(alice.id, first.conversation_id))
    visible = store.chats.messages(alice.id, first.conversation_id)
    everything = store.chats.messages(alice.id, first.conversation_id, include_replaced=True)
    assert [m["id"] for m in visible] == [first.user_message_id, again.assistant_message_id]
    assert [m["content"] for m in everything] == ["Which breed suits flats?", "A husky.", "A French bulldog."]
    assert store.chats.message(alice.id, first.assistant_message_id)["replaced_by"] == again.assistant_message_id
    assert "A husky." not in fake.prompts[1]  # the retried answer is not shown to the model


def test_a_retry_left_mid_answer_still_replaces_the_old_answer(fake_engine, fake, store, alice):
    """The browser tab closes while the retry streams: the conversation shows the partial retry, never both."""
    fake.enqueue(["A husky."]).enqueue(["A French", " bulldog", " or a pug."])
    first = run(fake_engine.send(alice.id, None, "Which breed suits flats?"))
    stream = fake_engine.retry(alice.id, first.conversation_id)
    while "French" not in next(stream).text:
        pass
    stream.close()  # GeneratorExit, as when the client goes away
    visible = store.chats.messages(alice.id, first.conversation_id)
    assert [m["role"] for m in visible] == ["user", "assistant"]
    assert visible[1]["content"].startswith("A French") and visible[1]["status"] == "stopped"
    assert store.chats.message(alice.id, first.assistant_message_id)["replaced_by"] == visible[1]["id"]


def test_correction_replaces_the_answer_in_later_prompts(fake_engine, fake, store, alice):
    fake.enqueue(["A husky."])
    first = run(fake_engine.send(alice.id, None, "Which breed suits flats?"))
    store.chats.add_feedback(alice.id, first.assistant_message_id, "correction", "A French bulldog.")
    run(fake_engine.send(alice.id, first.conversation_id, "Why?"))
    prompt = fake.prompts[-1]
    assert "assistant\nA French bulldog.<|im_end|>" in prompt and "husky" not in prompt


def test_other_users_conversation_is_not_reachable(fake_engine, fake, alice, bob):
    turn = run(fake_engine.send(alice.id, None, "private"))
    with pytest.raises(NotFound):
        run(fake_engine.send(bob.id, turn.conversation_id, "let me in"))
    with pytest.raises(NotFound):
        run(fake_engine.retry(bob.id, turn.conversation_id))
    assert len(fake.calls) == 1 and "private" in fake.calls[0].prompt  # only alice's turn reached the backend


def test_bad_generation_settings_name_the_field():
    with pytest.raises(InputError, match="temperature"):
        GenerationSettings.from_request(GenerationSettings(), temperature=5)
    with pytest.raises(InputError, match="max_new_tokens"):
        GenerationSettings.from_request(GenerationSettings(), max_new_tokens="many")


@pytest.mark.parametrize("text", ["Bonjour, ça va ? 你好，世界！ 🎉 emoji and ünïcödé text.",
                                  "line one\nline two  with   spaces 🐶🐶 end"])
def test_streamed_pieces_rebuild_the_answer_exactly(tiny_loaded, text):
    """The incremental decoder streams whole words, never half a character, and the pieces join to
    exactly what decoding the whole answer gives."""
    from assistant.engines.base import Request, StreamStats
    from assistant.engines.hf.backend import TransformersBackend

    backend = TransformersBackend(tiny_loaded)
    ids = tiny_loaded.tokenizer.encode(text, add_special_tokens=False)
    req = Request([], GenerationSettings(), threading.Event(), StreamStats(), None, False)
    for token in ids:
        req.ids.append(token)
        backend._flush(req, final=False)
    backend._finish(req)
    pieces = []
    while (piece := req.pieces.get()) is not None:
        pieces.append(piece)
    assert "".join(pieces) == tiny_loaded.tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(pieces) > 3 and not any("\ufffd" in p for p in pieces)
    sent = 0
    for piece in pieces[:-1]:  # every piece but the last ends at a word boundary
        sent += len(piece)
        assert piece.endswith((" ", "\n")) or text[sent] == " ", (piece, text[sent:])


def test_turn_options_name_the_bad_field():
    with pytest.raises(ValueError, match="source"):
        TurnOptions(source="")
    with pytest.raises(ValueError, match="settings"):
        TurnOptions({"temperature": 0})  # a dict is not GenerationSettings


def test_a_turn_reads_its_conversation_once(fake_engine, fake, store, alice, monkeypatch):
    """send, retry and answer each read the conversation's messages once: the prompt (and the memory query) use
    the history the turn already read (before, retry and answer read it twice, three times with memory)."""
    first = run(fake_engine.send(alice.id, None, "Hi"))
    cid = first.conversation_id
    reads = []
    real = store.chats.messages
    monkeypatch.setattr(store.chats, "messages", lambda *a, **k: reads.append(a) or real(*a, **k))
    fake.enqueue(["one"])
    run(fake_engine.send(alice.id, cid, "Again"))
    fake.enqueue(["two"])
    retried = run(fake_engine.retry(alice.id, cid))
    fake_engine.post(alice.id, cid, "And now?")
    fake.enqueue(["three"])
    answered = run(fake_engine.answer(alice.id, cid))
    assert len(reads) == 3
    assert retried.text == "two" and answered.text == "three"
    assert [m["content"] for m in real(alice.id, cid)] == ["Hi", first.text, "Again", "two", "And now?", "three"]
