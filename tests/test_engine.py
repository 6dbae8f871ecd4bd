"""assistant/: ChatEngine with the tiny random model — turns stored, context budget, stop, retry."""

import threading

import pytest

from assistant.backend import GenerationSettings
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
    texts = [t.text[:] for t in engine.send(alice.id, None, "Tell me about Paris", GenerationSettings(
        max_new_tokens=24, temperature=0))]
    assert len(texts) >= 3 and texts[-1].startswith(texts[-2]) and len(texts[-1]) > 0


def test_greedy_is_deterministic_and_settings_are_per_request(engine, alice):
    greedy = GenerationSettings(max_new_tokens=12, temperature=0)
    a = run(engine.send(alice.id, None, "Python is", greedy)).text
    b = run(engine.send(alice.id, None, "Python is", greedy)).text
    assert a == b
    short = run(engine.send(alice.id, None, "Python is", GenerationSettings(max_new_tokens=3, temperature=0)))
    assert short.stats.completion_tokens <= 3 and short.stats.finish_reason == "length"


def test_stop_keeps_the_partial_answer(engine, store, alice):
    stop = threading.Event()
    turn = None
    for turn in engine.send(alice.id, None, "Hello", GenerationSettings(max_new_tokens=200, temperature=0), stop):
        if turn.text:
            stop.set()
    assert turn.status == "stopped" and turn.stats.completion_tokens < 200
    assert store.chats.message(alice.id, turn.assistant_message_id)["status"] == "stopped"


def test_long_conversation_drops_oldest_turns(engine, store, alice):
    cid = store.chats.create_conversation(alice.id)
    for i in range(60):
        store.chats.add_message(alice.id, cid, "user", f"Message number {i} about my dog Biscuit and SQLite.")
        store.chats.add_message(alice.id, cid, "assistant", "Noted, that is very interesting indeed.")
    turn = run(engine.send(alice.id, cid, "And the latest question?"))
    assert turn.status == "complete" and turn.dropped_turns > 0 and not turn.truncated
    assert turn.stats.prompt_tokens <= engine.budget - 16


def test_200kb_message_is_stored_whole_and_truncated_for_the_model(engine, store, alice):
    text = "start " + "lorem ipsum dolor " * 11_500 + " end"
    assert len(text) > 200_000
    turn = run(engine.send(alice.id, None, text))
    assert turn.status == "complete" and turn.truncated
    assert store.chats.message(alice.id, turn.user_message_id)["content"] == text
    ids, plan = engine.build_prompt(alice.id, turn.conversation_id, 16)
    prompt = engine.backend.tokenizer.decode(ids)
    assert "characters omitted" in prompt and "start" in prompt and "end" in prompt


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_message_is_refused_and_nothing_stored(engine, store, alice, text):
    with pytest.raises(InputError, match="empty"):
        run(engine.send(alice.id, None, text))
    assert store.chats.conversations(alice.id) == []


def test_control_characters_and_emoji(engine, store, alice):
    text = "Hi 🎉🐶 \x07\x1b[2J \u202e reversed 中文 \ud800"
    turn = run(engine.send(alice.id, None, text))
    assert turn.status == "complete"
    assert store.chats.message(alice.id, turn.user_message_id)["content"] == text.replace("\ud800", "\ufffd")


def test_retry_replaces_the_answer_but_keeps_it_in_the_log(engine, store, alice):
    first = run(engine.send(alice.id, None, "Hello"))
    again = run(engine.retry(alice.id, first.conversation_id, GenerationSettings(max_new_tokens=8, temperature=1.0,
                                                                                    seed=7)))
    visible = store.chats.messages(alice.id, first.conversation_id)
    everything = store.chats.messages(alice.id, first.conversation_id, include_replaced=True)
    assert [m["id"] for m in visible] == [first.user_message_id, again.assistant_message_id]
    assert len(everything) == 3
    assert store.chats.message(alice.id, first.assistant_message_id)["replaced_by"] == again.assistant_message_id


def test_correction_replaces_the_answer_in_later_prompts(engine, store, alice):
    first = run(engine.send(alice.id, None, "Which breed suits flats?"))
    store.chats.add_feedback(alice.id, first.assistant_message_id, "correction", "A French bulldog.")
    store.chats.add_message(alice.id, first.conversation_id, "user", "Why?")
    ids, _ = engine.build_prompt(alice.id, first.conversation_id, 16)
    prompt = engine.backend.tokenizer.decode(ids)
    assert "A French bulldog." in prompt and first.text not in prompt.split("Which breed suits flats?")[1][:0] + ""


def test_other_users_conversation_is_not_reachable(engine, alice, bob):
    turn = run(engine.send(alice.id, None, "private"))
    with pytest.raises(NotFound):
        run(engine.send(bob.id, turn.conversation_id, "let me in"))
    with pytest.raises(NotFound):
        run(engine.retry(bob.id, turn.conversation_id))


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
    from assistant.backend import StreamStats, TransformersBackend, _Request

    backend = TransformersBackend(tiny_loaded)
    ids = tiny_loaded.tokenizer.encode(text, add_special_tokens=False)
    req = _Request([], GenerationSettings(), threading.Event(), StreamStats(), None, False)
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
