"""The OpenAI-compatible API, driven by the official ``openai`` client against a live ``launch.py serve``."""

from __future__ import annotations

import httpx
import openai
import pytest

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


def test_conversation_continues_and_feedback_lands(api):
    c = client(api)
    first = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Which breed suits flats?"}])
    info = first.model_extra["attune"]
    second = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Why?"}],
                                       extra_body={"conversation_id": info["conversation_id"], "use_memory": False})
    assert second.model_extra["attune"]["conversation_id"] == info["conversation_id"]
    assert len(rows(api, "SELECT * FROM messages WHERE conversation_id = ?", [info["conversation_id"]])) == 4
    r = httpx.post(api.base + "/v1/feedback", headers={"Authorization": f"Bearer {api.keys['alice']}"},
                   json={"message_id": info["message_id"], "feedback": "dislike", "correction": "A French bulldog."})
    assert r.status_code == 200 and r.json()["state"] == {"rating": "dislike", "correction": "A French bulldog."}
    fb = rows(api, "SELECT kind, correction, source FROM feedback WHERE message_id = ? ORDER BY id",
              [info["message_id"]])
    assert fb == [{"kind": "dislike", "correction": None, "source": "api"},
                  {"kind": "correction", "correction": "A French bulldog.", "source": "api"}]


def test_another_users_ids_are_not_reachable(api):
    a = client(api, "alice").chat.completions.create(model="x", messages=[{"role": "user", "content": "secret"}])
    info = a.model_extra["attune"]
    with pytest.raises(openai.NotFoundError, match="not yours"):
        client(api, "bob").chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                                   extra_body={"conversation_id": info["conversation_id"]})
    r = httpx.post(api.base + "/v1/feedback", headers={"Authorization": f"Bearer {api.keys['bob']}"},
                   json={"message_id": info["message_id"], "feedback": "like"})
    assert r.status_code == 404 and "not yours" in r.json()["error"]["message"]
    assert rows(api, "SELECT * FROM feedback WHERE message_id = ?", [info["message_id"]]) == []


def test_bad_key_is_401(api):
    with pytest.raises(openai.AuthenticationError, match="Invalid API key"):
        client(api, key="att-000000000000-wrong").chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}])
    r = httpx.get(api.base + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


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
])
def test_malformed_requests_are_400_with_a_message(api, body, match):
    before = rows(api, "SELECT COUNT(*) AS n FROM messages")[0]["n"]
    r = httpx.post(api.base + "/v1/chat/completions", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {api.keys['alice']}"})
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"]
    assert rows(api, "SELECT COUNT(*) AS n FROM messages")[0]["n"] == before


def test_invalid_json_and_binary_bodies(api):
    for raw in (b"{not json", b"\xff\xfe\x00binary"):
        r = httpx.post(api.base + "/v1/chat/completions", content=raw, timeout=30,
                       headers={"Authorization": f"Bearer {api.keys['alice']}", "Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid UTF-8 JSON" in r.json()["error"]["message"]


def test_models_lists_the_base_model(api):
    models = client(api).models.list()
    assert [m.id for m in models.data]
