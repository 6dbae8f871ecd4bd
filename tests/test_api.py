"""The OpenAI-compatible API, driven by the official ``openai`` client: end to end against a live
``launch.py serve`` on the tiny random Llama, and in process on the scripted FakeBackend (tests/fakes.py)
where the model is not the point (logging, scoping, feedback, errors), so answers are known exactly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import openai
import pytest

from fakes import activate_version
from helpers import Server, cli, db_rows


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("api") / "data"
    for name in ("alice", "bob"):
        assert cli("users", "add", name, data_dir=data, stdin="correct horse\n").returncode == 0
    keys = {n: cli("users", "key", n, data_dir=data).stdout.strip() for n in ("alice", "bob")}
    with Server(data, "--model", str(tiny_model_dir), "--quant", "none", "--max-new-tokens", "12",
                "--temperature", "0") as srv:
        srv.data, srv.keys = data, keys
        yield srv


def client(api, user="alice", key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.base + "/v1", api_key=key or api.keys[user], max_retries=0, timeout=60)


rows = db_rows


@pytest.fixture
def fapi(store, fake):
    """The /v1 router in process over ChatService + FakeBackend, users alice and bob with keys."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from assistant.api.routes import build_router
    from assistant.chat.service import ChatConfig, ChatService
    from assistant.engines.base import GenerationSettings

    engine = ChatService(store, fake, ChatConfig(defaults=GenerationSettings(max_new_tokens=12, temperature=0)))
    app = FastAPI()
    app.include_router(build_router(engine))
    users = {n: store.users.create(n, "correct horse") for n in ("alice", "bob")}
    keys = {n: store.users.new_api_key(u.id) for n, u in users.items()}
    with TestClient(app, base_url="http://attune.test") as http:
        yield SimpleNamespace(http=http, store=store, fake=fake, engine=engine, users=users, keys=keys,
                              data=store.data_dir.root)


def fclient(fapi, user="alice", key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://attune.test/v1", api_key=key or fapi.keys[user], max_retries=0,
                         http_client=fapi.http)


def post(fapi, path, body=None, user="alice", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {fapi.keys[user]}"} if user else {}
    return fapi.http.post(path, json=body, headers=headers, **kw)


def test_chat_completion_is_logged_for_the_keys_user(api):
    resp = client(api).chat.completions.create(
        model="anything", messages=[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "My dog is called Biscuit."}])
    extra = resp.model_extra["attune"]
    assert resp.choices[0].message.role == "assistant" and resp.usage.completion_tokens > 0
    assert resp.system_fingerprint == "attune-base" and extra["adapter_version"] is None
    answer = rows(api, "SELECT * FROM messages WHERE id = ?", [extra["message_id"]])[0]
    alice = rows(api, "SELECT id FROM users WHERE name = 'alice'")[0]["id"]
    assert answer["content"] == resp.choices[0].message.content and answer["source"] == "api"
    assert answer["user_id"] == alice
    convo = rows(api, "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id",
                 [extra["conversation_id"]])
    assert [m["role"] for m in convo] == ["system", "user", "assistant"]


def test_streaming_matches_the_stored_answer(api):
    chunks = list(client(api).chat.completions.create(
        model="x", stream=True, max_tokens=10, messages=[{"role": "user", "content": "Tell me about Paris"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = chunks[-1]
    assert final.choices[0].finish_reason in ("stop", "length")
    info = final.model_extra["attune"]
    assert rows(api, "SELECT content FROM messages WHERE id = ?", [info["message_id"]])[0]["content"] == text
    assert len(chunks) >= 3


def test_scripted_answer_json_and_usage(fapi):
    fapi.fake.enqueue(["Hello", " world"])
    resp = fclient(fapi).chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}])
    assert resp.choices[0].message.content == "Hello world" and resp.choices[0].finish_reason == "stop"
    assert resp.model == "fake-model" and resp.system_fingerprint == "attune-base"
    prompt_tokens = len(fapi.fake.calls[0].prompt_ids)
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == \
        (prompt_tokens, 2, prompt_tokens + 2)
    assert fapi.fake.calls[0].adapter is None  # alice has no adapter yet: the base model


def test_streamed_chunks_carry_the_scripted_pieces(fapi):
    fapi.fake.enqueue(["Par", "is ", "is ", "big."])
    chunks = list(fclient(fapi).chat.completions.create(
        model="x", stream=True, messages=[{"role": "user", "content": "Tell me about Paris"}]))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices]
    assert deltas == ["", "Par", "is ", "is ", "big.", None]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"
    info = chunks[-1].model_extra["attune"]
    assert rows(fapi, "SELECT content FROM messages WHERE id = ?", [info["message_id"]])[0]["content"] == \
        "Paris is big."
    assert chunks[-1].usage.completion_tokens == 4


def test_adapter_version_and_switches_reach_the_backend(fapi):
    alice = fapi.users["alice"].id
    activate_version(fapi.store, alice, 4)
    c = fclient(fapi)
    on = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    off = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                    extra_body={"use_adapter": False})
    assert on.system_fingerprint == "attune-adapter-v4" and on.model_extra["attune"]["adapter_version"] == 4
    assert off.system_fingerprint == "attune-base" and [x.adapter_version for x in fapi.fake.calls] == [4, None]


def test_length_limit_is_reported(fapi):
    fapi.fake.enqueue(["a", "b", "c", "d"])
    r = post(fapi, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0] == {
        "index": 0, "message": {"role": "assistant", "content": "ab"}, "finish_reason": "length"}


def test_a_streamed_answer_arrives_as_decoded_and_a_client_that_leaves_stops_it(store, tmp_path):
    """Through a real uvicorn: the first words reach the client while the rest is still being decoded, and closing
    the connection mid-answer stops the engine; the answer so far is stored as stopped."""
    import threading
    import time

    import uvicorn
    from fastapi import FastAPI

    from assistant.api.routes import build_router
    from assistant.chat.service import ChatConfig, ChatService
    from assistant.engines.base import GenerationSettings
    from fakes import FakeBackend
    from helpers import free_port, wait_for

    fake = FakeBackend(piece_seconds=0.02).enqueue([f"w{i} " for i in range(300)])  # 6 s in all
    chat = ChatService(store, fake, ChatConfig(defaults=GenerationSettings(max_new_tokens=400, temperature=0)))
    app = FastAPI()
    app.include_router(build_router(chat))
    key = store.users.new_api_key(store.users.create("alice", "correct horse").id)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30)
    try:
        started, seen = time.monotonic(), ""
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"messages": [{"role": "user", "content": "Count"}], "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if len(seen.split()) >= 5:
                    break
        first_words = time.monotonic() - started
        assert seen.startswith("w0 w1 w2 w3 w4") and first_words < 3, first_words  # not held until the end

        def stored():
            return store.db.execute("SELECT status, content, completion_tokens FROM messages "
                                    "WHERE role = 'assistant'").fetchall()

        wait_for(lambda: stored(), 10)
        (status, content, tokens), = stored()
        assert status == "stopped" and content.startswith(seen) and tokens < 200
        assert time.monotonic() - started < 5  # stopped, not decoded to the end (6 s)
    finally:
        server.should_exit = True
        thread.join(30)
        chat.shutdown()


def test_a_failed_generation_is_500_and_logged(fapi):
    fapi.fake.fail(RuntimeError("CUDA out of memory"))
    r = post(fapi, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500 and "CUDA out of memory" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    assert rows(fapi, "SELECT status FROM messages WHERE role = 'assistant'") == [{"status": "error"}]
    fapi.fake.fail(RuntimeError("CUDA out of memory"))
    r = post(fapi, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert "CUDA out of memory" in json.loads(events[-3])["error"]["message"] and events[-1] == "[DONE]"
    assert json.loads(events[-2])["attune"]["status"] == "error"


def test_conversation_continues_and_feedback_lands(fapi):
    fapi.fake.enqueue(["A husky."])
    c = fclient(fapi)
    first = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Which breed suits flats?"}])
    info = first.model_extra["attune"]
    second = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Why?"}],
                                       extra_body={"conversation_id": info["conversation_id"], "use_memory": False})
    assert second.model_extra["attune"]["conversation_id"] == info["conversation_id"]
    assert "assistant\nA husky.<|im_end|>" in fapi.fake.prompts[-1]  # the earlier turn is in the prompt
    assert len(rows(fapi, "SELECT * FROM messages WHERE conversation_id = ?", [info["conversation_id"]])) == 4
    r = post(fapi, "/v1/feedback", {"message_id": info["message_id"], "feedback": "dislike",
                                    "correction": "A French bulldog."})
    assert r.status_code == 200 and r.json()["state"] == {"rating": "dislike", "correction": "A French bulldog."}
    fb = rows(fapi, "SELECT kind, correction, source FROM feedback WHERE message_id = ? ORDER BY id",
              [info["message_id"]])
    assert fb == [{"kind": "dislike", "correction": None, "source": "api"},
                  {"kind": "correction", "correction": "A French bulldog.", "source": "api"}]


def test_another_users_ids_are_not_reachable(fapi):
    a = fclient(fapi, "alice").chat.completions.create(model="x", messages=[{"role": "user", "content": "secret"}])
    info = a.model_extra["attune"]
    with pytest.raises(openai.NotFoundError, match="not yours"):
        fclient(fapi, "bob").chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                                     extra_body={"conversation_id": info["conversation_id"]})
    r = post(fapi, "/v1/feedback", {"message_id": info["message_id"], "feedback": "like"}, user="bob")
    assert r.status_code == 404 and "not yours" in r.json()["error"]["message"]
    assert rows(fapi, "SELECT * FROM feedback WHERE message_id = ?", [info["message_id"]]) == []
    assert len(fapi.fake.calls) == 1  # only alice's own request reached the backend


def test_bad_key_is_401(fapi):
    with pytest.raises(openai.AuthenticationError, match="Invalid API key"):
        fclient(fapi, key="att-000000000000-wrong").chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}])
    r = fapi.http.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "users key NAME" in r.json()["error"]["message"]


def test_401_on_a_fresh_install_says_to_add_a_user_first(store, fake):
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from assistant.api.routes import build_router
    from assistant.chat.service import ChatService

    app = FastAPI()
    app.include_router(build_router(ChatService(store, fake)))
    with TestClient(app) as http:
        for headers in ({}, {"Authorization": "Bearer att-000000000000-wrong"}):
            r = http.get("/v1/models", headers=headers)
            message = r.json()["error"]["message"]
            assert r.status_code == 401 and "No user exists yet" in message and "users add NAME" in message


@pytest.mark.parametrize("body,match", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role must be"),
    ({"messages": [{"role": "user", "content": 5}]}, "content must be"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "last message"),
    ({"messages": [{"role": "user", "content": "   "}]}, "empty"),
    ({"messages": [{"role": "user", "content": "x" * 1_000_001}]}, "limit"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "conversation_id": "abc"}, "conversation_id"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n=1"),
    ({"messages": [{"role": "system", "content": "x" * 1_000_001}, {"role": "user", "content": "x"}]},
     "messages[0].content is 1,000,001 characters"),
    ({"messages": [{"role": "user", "content": "x"}] * 513}, "at most 512 in one request"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4097}, "at most 4,096 tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "from 1 to 4,096"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "'max_tokens' must be a whole number"),
    # seeds the engines' generators refuse (numpy: negative; torch: past 2**64) were 500s from the real engines
    ({"messages": [{"role": "user", "content": "x"}], "seed": -1}, "seed: must be an integer from 0"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed: must be an integer from 0"),
])
def test_malformed_requests_are_400_with_a_message(fapi, body, match):
    r = post(fapi, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
    assert rows(fapi, "SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0 and fapi.fake.calls == []
    assert rows(fapi, "SELECT COUNT(*) AS n FROM conversations")[0]["n"] == 0  # validated before anything is stored


@pytest.mark.parametrize("raw,match", [
    (b"[" * 100_000 + b"]" * 100_000, "more than 32 deep"),  # was a RecursionError: 500
    (b'{"messages": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}", "more than 32 deep"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1' + b"0" * 5000 + b"}",
     "number too long"),  # was Python's int digit limit (ValueError): 500
])
def test_bodies_json_cannot_hold_are_400(fapi, raw, match):
    r = fapi.http.post("/v1/chat/completions", content=raw, headers={
        "Authorization": f"Bearer {fapi.keys['alice']}", "Content-Type": "application/json"})
    assert r.status_code == 400 and match in r.json()["error"]["message"], r.text


def test_a_lone_surrogate_in_a_new_conversations_first_message_is_stored(fapi):
    """Was a 500: the conversation's title kept the lone surrogate, which SQLite cannot store as UTF-8."""
    raw = b'{"messages": [{"role": "user", "content": "caf\\ud800 au lait"}]}'
    r = fapi.http.post("/v1/chat/completions", content=raw, headers={
        "Authorization": f"Bearer {fapi.keys['alice']}", "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert rows(fapi, "SELECT title FROM conversations") == [{"title": "caf\ufffd au lait"}]
    assert fapi.store.chats.create_conversation(fapi.users["bob"].id, title="\udfff") > 0


def _limited(fapi, **limits):
    """A client of the /v1 router over fapi's engine with these APIConfig limits."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from assistant.api.protocol import APIConfig
    from assistant.api.routes import build_router

    app = FastAPI()
    app.include_router(build_router(fapi.engine, APIConfig(**limits)))
    return app, TestClient(app, headers={"Authorization": f"Bearer {fapi.keys['alice']}"})


def test_limits_on_messages_and_max_tokens_are_the_configs(fapi):
    app, http = _limited(fapi, max_messages=3, max_tokens=5)
    three = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "s"}, *three]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["message"].startswith("'messages' has 4 messages; this server takes at most 3 in one request")
    assert "--api-max-messages" in error["message"] and "'conversation_id'" in error["message"]
    r = http.post("/v1/chat/completions", json={"messages": three, "max_tokens": 6})
    assert r.status_code == 400 and "'max_tokens' is 6; this server answers with at most 5 tokens" in \
        r.json()["error"]["message"] and "leave it out for the default (5)" in r.json()["error"]["message"]
    assert fapi.fake.calls == []
    assert http.post("/v1/chat/completions", json={"messages": three, "max_tokens": 5}).status_code == 200
    assert http.post("/v1/chat/completions", json={"messages": three}).status_code == 200
    assert [c.settings.max_new_tokens for c in fapi.fake.calls] == [5, 5]  # the default (12) is capped too
    body = app.openapi()["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["properties"]["messages"]["maxItems"] == 3
    assert body["schema"]["properties"]["max_tokens"]["maximum"] == 5


def _asgi_post(app, headers: list, chunks) -> tuple[int, dict, int]:
    """POST /v1/chat/completions straight through ASGI, the body coming as ``chunks``: (status, JSON, bytes the
    app pulled)."""
    import asyncio

    pulled, sent, out = 0, iter(chunks), {}

    async def receive():
        nonlocal pulled
        chunk = next(sent, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] = out.get("body", b"") + message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
             "headers": headers, "client": ("127.0.0.1", 5000), "server": ("attune.test", 80)}
    asyncio.run(app(scope, receive, send))
    return out["status"], json.loads(out["body"]), pulled


def test_a_body_over_the_limit_is_413_before_it_is_read(fapi):
    app, _ = _limited(fapi, max_body_bytes=4096)
    auth = (b"authorization", f"Bearer {fapi.keys['alice']}".encode())
    endless = (b"x" * 1000 for _ in range(10**9))  # a client that would send a terabyte
    status, body, pulled = _asgi_post(app, [auth, (b"content-length", b"1000000000000")], endless)
    assert (status, pulled) == (413, 0)  # refused on the declared length: nothing read
    assert body["error"]["message"].startswith("The request body is 1,000,000,000,000 bytes; this server reads at "
                                               "most 4,096 bytes (its --api-max-body-bytes). Send less")
    assert body["error"]["type"] == "invalid_request_error"
    status, body, pulled = _asgi_post(app, [auth], endless)  # chunked: no length said
    assert status == 413 and 4096 < pulled <= 5000 and "is over 4,096 bytes" in body["error"]["message"]
    status, _, _ = _asgi_post(app, [auth], [json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()])
    assert status == 200
    status, body, pulled = _asgi_post(app, [(b"content-length", b"1000000000000")], endless)
    assert (status, pulled) == (401, 0)  # without a key nothing is read at all
    assert rows(fapi, "SELECT COUNT(*) AS n FROM messages")[0]["n"] == 2


@pytest.mark.parametrize("field,value", [("max_body_bytes", 10), ("max_messages", 0), ("max_tokens", 4097),
                                         ("max_tokens", "5"), ("max_messages", True)])
def test_api_config_names_the_bad_field(field, value):
    from assistant.api.protocol import APIConfig

    with pytest.raises(ValueError, match=f"^{field}: must be an integer"):
        APIConfig(**{field: value})


@pytest.mark.parametrize("body,status,match", [
    ({"feedback": "like"}, 400, "message_id"),
    ({"message_id": 1}, 400, "and/or a 'correction'"),
    ({"message_id": 1, "feedback": "meh"}, 400, "'feedback' must be"),
    ({"message_id": "1", "feedback": "like"}, 404, "does not exist"),
    ({"message_id": 999, "feedback": "like"}, 404, "does not exist"),
])
def test_malformed_feedback(fapi, body, status, match):
    r = post(fapi, "/v1/feedback", body)
    assert r.status_code == status and match in r.json()["error"]["message"]


def test_invalid_json_and_binary_bodies(fapi):
    for raw in (b"{not json", b"\xff\xfe\x00binary"):
        r = fapi.http.post("/v1/chat/completions", content=raw, headers={
            "Authorization": f"Bearer {fapi.keys['alice']}", "Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid UTF-8 JSON" in r.json()["error"]["message"]


def test_models_lists_the_base_model(fapi):
    assert [m.id for m in fclient(fapi).models.list().data] == ["fake-model"]


def test_models_lists_the_live_model(api):
    models = client(api).models.list()
    assert [m.id for m in models.data]


def test_the_ui_queue_does_not_wake_the_server_every_millisecond(store):
    """Gradio's queue polls every 1 ms by default, which slows every answer on a small CPU (assistant.server
    .quiet_queue); a Gradio upgrade that renames its settings must fail here, not slow answers unnoticed."""
    from assistant.chat.service import ChatService
    from assistant.server import QUEUE_POLL_S, build_app
    from fakes import FakeBackend

    app = build_app(ChatService(store, FakeBackend()))
    blocks = next(r.app.get_blocks() for r in app.routes if hasattr(getattr(r, "app", None), "get_blocks"))
    assert blocks._queue.sleep_when_free >= QUEUE_POLL_S
    assert blocks._queue.progress_update_sleep_when_free >= QUEUE_POLL_S
