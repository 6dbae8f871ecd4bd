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
    """The /v1 router in process over ChatEngine + FakeBackend, users alice and bob with keys."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from assistant.api import build_router
    from assistant.backend import GenerationSettings
    from assistant.engine import ChatConfig, ChatEngine

    engine = ChatEngine(store, fake, ChatConfig(defaults=GenerationSettings(max_new_tokens=12, temperature=0)))
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

    from assistant.api import build_router
    from assistant.engine import ChatEngine

    app = FastAPI()
    app.include_router(build_router(ChatEngine(store, fake)))
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
])
def test_malformed_requests_are_400_with_a_message(fapi, body, match):
    r = post(fapi, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
    assert rows(fapi, "SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0 and fapi.fake.calls == []


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
