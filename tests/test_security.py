"""Security promises that need no browser: no outbound network at run time, the UI's internal
events are not a callable API, another user's data is unreachable by id or file path."""

from __future__ import annotations

import ipaddress
import json
import socket

import pytest

from assistant.chat.service import TurnOptions
from assistant.engines.base import GenerationSettings
from storage import DataDir, NotFound
from storage.paths import _uid


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection beyond loopback raises (and is recorded)."""
    attempts = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host in ("localhost",) or isinstance(address, str)  # unix sockets are local
        if not loopback:
            attempts.append(address)
            raise OSError(f"blocked outbound connection to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", _no_dns(socket.getaddrinfo, attempts))
    return attempts


def _no_dns(real, attempts):
    def lookup(host, *args, **kwargs):
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            attempts.append(("dns", host))
            raise socket.gaierror(f"blocked DNS lookup of {host!r}")
        return real(host, *args, **kwargs)
    return lookup


def test_full_chat_memory_and_training_without_network(no_network, store, alice, tiny_model_dir, tmp_path):
    from assistant.chat.service import ChatConfig, ChatService
    from assistant.engines.hf.backend import TransformersBackend
    from assistant.memory.service import MemoryConfig, MemoryService
    from assistant.model import ModelConfig, load_model
    from personalize.api import train_now
    from personalize.config import TrainConfig
    from storage.transfer import import_history

    loaded = load_model(ModelConfig(model=str(tiny_model_dir), quant="none", device="cpu"),
                        DataDir(tmp_path / "m").ensure())
    memory = MemoryService(store, MemoryConfig())  # the real packaged MiniLM, offline
    engine = ChatService(store, TransformersBackend(loaded, 512), ChatConfig(context_tokens=512), memory)
    turn = None
    four = TurnOptions(GenerationSettings(max_new_tokens=4))
    for turn in engine.send(alice.id, None, "My dog is called Biscuit.", four):
        pass
    assert turn.status == "complete" and store.memories.count(alice.id) == 1
    history = tmp_path / "h.jsonl"
    history.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                          {"role": "assistant", "content": f"Answer {i}."}]})
                                 for i in range(8)))
    import_history(store, alice.id, history)
    result = train_now(store, alice.id, ModelConfig(model=str(tiny_model_dir), quant="none", device="cpu"),
                       TrainConfig(rank=4, alpha=8, epochs=1, max_steps=4, max_seq_len=64, anchor_count=4,
                                   anchor_max_new_tokens=4, anchor_margin=100.0, mixed_precision="no"))
    assert result["job_id"] and result["reason"]
    assert no_network == []


def test_ui_events_are_not_a_public_api(engine, alice):
    from fastapi.testclient import TestClient

    from assistant.server import build_app

    client = TestClient(build_app(engine))
    assert client.get("/gradio_api/info").status_code == 401  # no session: no Gradio route at all
    signed_in = client.post("/auth/signin", data={"username": "alice", "password": "correct horse"},
                            follow_redirects=False)
    assert signed_in.status_code == 303
    info = client.get("/gradio_api/info")
    assert info.status_code == 200
    assert info.json()["named_endpoints"] == {} and info.json()["unnamed_endpoints"] == {}


def test_sessions_are_server_side_hashed_revocable_and_expire(engine, store, alice):
    from datetime import timedelta

    from fastapi.testclient import TestClient

    from assistant.server import build_app

    client = TestClient(build_app(engine))
    for path in ("/", "/config", "/gradio_api/info", "/gradio_api/queue/data?session_hash=x", "/account/export"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code in (303, 401), path
    r = client.post("/auth/signin", data={"username": "alice", "password": "correct horse"}, follow_redirects=False)
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=" in cookie
    token = client.cookies["attune_session"]
    row = store.db.execute("SELECT token_hash FROM sessions").fetchone()
    assert token not in row[0] and len(row[0]) == 64  # only a hash is stored
    assert client.get("/", follow_redirects=False).status_code == 200
    assert client.get("/account/export").json()["user"]["name"] == "alice"
    client.post("/auth/signout", follow_redirects=False)
    stale = TestClient(client.app, cookies={"attune_session": token})
    assert stale.get("/config").status_code == 401
    short = store.sessions.create(alice.id, timedelta(seconds=-1))
    assert store.sessions.user(short) is None  # expired
    assert store.sessions.user("forged") is None
    live = store.sessions.create(alice.id, timedelta(days=1))
    assert store.sessions.user(live).id == alice.id
    assert store.sessions.revoke_all(alice.id) == 2 and store.sessions.user(live) is None


def test_sign_in_form_refuses_other_sites_and_closed_signup(engine, store):
    from fastapi.testclient import TestClient

    from assistant.server import build_app

    client = TestClient(build_app(engine, allow_signup=False))
    page = client.get("/signin").text
    assert "signup-btn" not in page and "first-run" not in page
    r = client.post("/auth/signup", data={"username": "mallory", "password": "correct horse"})
    assert r.status_code == 403 and store.users.count() == 0
    open_client = TestClient(build_app(engine))
    r = open_client.post("/auth/signup", data={"username": "mallory", "password": "correct horse"},
                         headers={"Origin": "http://evil.example"}, follow_redirects=False)
    assert r.status_code == 403 and store.users.count() == 0
    huge = {"username": "mallory", "password": "x" * 100_000}
    r = open_client.post("/auth/signup", data=huge, follow_redirects=False)
    assert r.status_code == 413 and "too long" in r.text and store.users.count() == 0

    def endless():  # no declared length: refused once 16 KiB have come
        yield b"username=mallory&password="
        for _ in range(1000):
            yield b"x" * 1024

    r = open_client.post("/auth/signin", content=endless(), follow_redirects=False,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    r = open_client.post("/auth/signup", data={"username": "mallory", "password": "correct horse"},
                         follow_redirects=False)
    assert r.status_code in (302, 303) and store.users.count() == 1  # a normal form still works
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405)):
        r = open_client.request(method, path)  # the API's own error shape, saying what exists
        assert r.status_code == status and "POST /v1/chat/completions" in r.json()["error"]["message"]


def test_uploads_are_refused_with_or_without_a_session(engine, alice):
    from fastapi.testclient import TestClient

    from assistant.server import build_app

    client = TestClient(build_app(engine))
    assert client.post("/gradio_api/upload", files={"files": ("a.txt", b"x")}).status_code == 403
    client.post("/auth/signin", data={"username": "alice", "password": "correct horse"})
    assert client.post("/gradio_api/upload", files={"files": ("a.txt", b"x")}).status_code == 403


def test_a_revoked_api_key_stops_working_at_once(engine, store, alice):
    from fastapi.testclient import TestClient

    from assistant.server import build_app

    client = TestClient(build_app(engine))
    key = store.users.new_api_key(alice.id, "laptop")
    auth = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/models", headers=auth).status_code == 200  # now cached
    assert [k["name"] for k in store.users.api_keys(alice.id)] == ["laptop"]
    store.users.revoke_api_key(alice.id, key.split("-")[1])
    assert client.get("/v1/models", headers=auth).status_code == 401
    assert store.users.api_keys(alice.id) == []


def test_user_ids_never_become_free_form_paths(tmp_path):
    dd = DataDir(tmp_path)
    assert dd.adapters(7).name == "u7" and dd.memory_index(7).name == "u7.faiss"
    for bad in ("../../etc", "7", -1, 0, True, 2.5):
        with pytest.raises(ValueError):
            _uid(bad)


def test_ids_of_another_user_look_like_missing_ones(store, alice, bob):
    cid = store.chats.create_conversation(alice.id)
    mid = store.chats.add_message(alice.id, cid, "user", "private")
    for getter in (lambda: store.chats.message(bob.id, mid), lambda: store.chats.messages(bob.id, cid),
                   lambda: store.memories.get(bob.id, 1), lambda: store.jobs.get(bob.id, 1),
                   lambda: store.adapters.get(bob.id, 1)):
        with pytest.raises(NotFound):
            getter()


# throttling of guesses (issue 28) ------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def test_wrong_passwords_lock_that_name_then_the_address_growing_and_across_restarts(engine, store, alice, bob):
    from fastapi.testclient import TestClient

    from assistant.server import build_app
    from storage import Store
    from storage.throttle import Throttle

    clock = Clock()
    store.throttle = Throttle(store, clock=clock)
    client = TestClient(build_app(engine), client=("10.0.0.1", 5000), follow_redirects=False)

    def sign_in(name, password, c=client):
        return c.post("/auth/signin", data={"username": name, "password": password})

    for _ in range(5):
        assert sign_in("alice", "wrong horse").status_code == 401
    locked = sign_in("alice", "correct horse")  # the right password is refused too while it lasts
    assert locked.status_code == 429 and 0 < int(locked.headers["Retry-After"]) <= 15 * 60
    assert "Try again in 15 min" in locked.text
    assert sign_in("bob", "battery staple").status_code == 303  # another name from the same address: fine
    for _ in range(6):  # a guesser trying on while locked, once a minute: the wait grows instead of running out
        clock.now += 60
        again = sign_in("alice", "correct horse")
        assert again.status_code == 429
    assert int(again.headers["Retry-After"]) > int(locked.headers["Retry-After"]) - 6 * 60
    clock.now += 4 * 60
    zh = TestClient(build_app(engine), client=("10.0.0.9", 5000), headers={"Accept-Language": "zh-CN"})
    assert "分钟后再试" in zh.post("/auth/signin", data={"username": "alice", "password": "x" * 10}).text
    reopened = Store(store.data_dir)  # the lock is rows: a restarted (or another) server process sees it
    try:
        assert Throttle(reopened, clock=clock)._wait("password", "name", "alice", 5, 15 * 60) > 0
    finally:
        reopened.close()
    clock.now += 16 * 60
    assert sign_in("alice", "correct horse").status_code == 303  # the window passed: the right password works
    assert store.db.execute("SELECT COUNT(*) FROM auth_failures WHERE name = 'alice'").fetchone()[0] == 0
    for n in range(20):  # many names from one address lock the address
        sign_in(f"nobody{n}", "wrong horse")
    assert sign_in("bob", "battery staple").status_code == 429
    other = TestClient(build_app(engine), client=("10.0.0.2", 5000), follow_redirects=False)
    assert sign_in("bob", "battery staple", other).status_code == 303  # another address is not affected


def test_bad_api_keys_from_one_address_get_429(engine, store, alice):
    from fastapi.testclient import TestClient

    from assistant.server import build_app
    from storage.throttle import Throttle

    clock = Clock()
    store.throttle = Throttle(store, clock=clock)
    guesser = TestClient(build_app(engine), client=("10.0.0.3", 5000))
    for n in range(20):
        r = guesser.get("/v1/models", headers={"Authorization": f"Bearer attune-guess{n}-xxxxxxxx"})
        assert r.status_code == 401
    key = store.users.new_api_key(alice.id, "laptop")
    r = guesser.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error" and r.headers["Retry-After"]
    honest = TestClient(build_app(engine), client=("10.0.0.4", 5000))
    assert honest.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    clock.now += 61
    assert guesser.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
