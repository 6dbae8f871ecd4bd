"""Fuzzing the HTTP API with 1,000+ generated requests: the whole app of ``assistant.server.build_app`` (the ``/v1``
API, the sign-in routes, ``/healthz``) served by uvicorn on a loopback port, over ChatService + the scripted
FakeBackend (tests/fakes.py) and personal memory on the hash embedder, so a request takes milliseconds.

Two sources of requests, both sent with a valid API key, with none, with a wrong key or a malformed header:

- Schemathesis, from the app's own OpenAPI schema (``app.openapi()``): for every operation, requests that fit
  the schema (positive) and requests that break it (negative);
- Hypothesis, for what Schemathesis never sends: lone surrogates (JSON ``\\ud800`` escapes), integers past 64
  bits and past Python's 4,300 digits, NaN, deep nesting, and odd header values (Origin, Cookie, Host ...).

No request may answer 5xx (or drop the connection), and every 4xx of ``/v1`` must be the API's error shape with a
message. The counts are printed in the test output. Bugs it found are pinned in tests/test_api.py (and below).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from helpers import free_port

EXAMPLES = {"/v1/chat/completions": 200, "/v1/feedback": 80, "/v1/models": 40}
"""Schemathesis examples per mode (positive, negative) of each operation; the others get ``OTHER_EXAMPLES`` (an
operation without parameters stops early: only the way it authenticates varies)."""
OTHER_EXAMPLES = 25
RAW_EXAMPLES = {"chat": 250, "feedback": 80, "headers": 150}
"""Hypothesis examples of raw chat bodies, raw feedback bodies, and odd headers on every route."""
AUTHS = ("key", "key", "key", "none", "wrong", "malformed")
"""How each request authenticates: mostly with alice's key, so most requests reach validation."""
FUZZ = settings(deadline=None, database=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))


class Served:
    """``build_app`` over a FakeBackend engine, served by uvicorn in a thread until ``stop``."""

    def __init__(self, data_dir):
        import uvicorn

        from assistant.chat.service import ChatConfig, ChatService
        from assistant.engines.base import GenerationSettings
        from assistant.memory.service import MemoryConfig, MemoryService
        from assistant.server import build_app
        from fakes import FakeBackend
        from storage import Store
        from storage.throttle import ThrottleConfig

        self.store = Store(data_dir)
        # Lockouts are tested in test_security; here every request with alice's key must reach the handlers.
        self.store.throttle.config = ThrottleConfig(name_failures=10**6, address_failures=10**6,
                                                    key_failures=10**6)
        self.memory = MemoryService(self.store, MemoryConfig(embedder="hash"))  # memory on: recalled and recorded
        self.engine = ChatService(self.store, FakeBackend(), ChatConfig(
            context_tokens=512, defaults=GenerationSettings(max_new_tokens=8, temperature=0)), self.memory)
        alice = self.store.users.create("alice", "correct horse")
        self.key = self.store.users.new_api_key(alice.id)
        self.app = build_app(self.engine)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def headers(self, auth: str) -> dict:
        return {"key": {"Authorization": f"Bearer {self.key}"}, "none": {},
                "wrong": {"Authorization": "Bearer att-000000000000-wrong"},
                "malformed": {"Authorization": "Basic YWxpY2U6cGFzcw=="}}[auth]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.shutdown()
        self.memory.close()
        self.store.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv = Served(tmp_path_factory.mktemp("fuzz") / "data")
    yield srv
    srv.stop()


class Tally:
    """Statuses by class, and every answer that breaks the rules, with the request that got it."""

    def __init__(self):
        self.counts, self.failures, self.sources = Counter(), [], Counter()

    def send(self, source: str, path: str, request: str, call) -> None:
        """``call()`` one request and check its answer; a dropped connection is a failure too."""
        self.sources[source] += 1
        try:
            response = call()
        except requests.RequestException as e:
            self.counts["no answer"] += 1
            self.failures.append(f"no answer ({type(e).__name__}): {request}")
            return
        self.counts[response.status_code // 100 * 100] += 1
        problem = _problem(path, response)
        if problem:
            self.failures.append(f"{problem}: {request}\n  -> {response.status_code} {response.text[:300]}")

    @property
    def requests(self) -> int:
        return sum(self.sources.values())


def _problem(path: str, response) -> str | None:
    if response.status_code >= 500:
        return f"{response.status_code} server error"
    if path.startswith("/v1/") and response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return "a /v1 error without the API's error shape"
        if not isinstance(message, str) or len(message) < 10:
            return "a /v1 error without a clear message"
    return None


# Schemathesis: from the OpenAPI schema ----------------------------------------------------------------
def _from_schema(srv: Served, session: requests.Session, tally: Tally) -> None:
    schema = schemathesis.openapi.from_dict(srv.app.openapi())
    for result in schema.get_all_operations():
        operation = result.ok()
        examples = EXAMPLES.get(operation.path, OTHER_EXAMPLES)
        breakable = list(operation.body) or list(operation.iter_parameters())  # else there is nothing to break
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if breakable else (GenerationMode.POSITIVE,):

            @settings(FUZZ, max_examples=examples)
            @given(case=operation.as_strategy(generation_mode=mode), auth=st.sampled_from(AUTHS))
            def run(case, auth):
                headers = srv.headers(auth)
                tally.send(f"schemathesis {mode.value}", case.path, case.as_curl_command(headers=headers),
                           lambda: case.call(base_url=srv.base, session=session, headers=headers, timeout=30))

            run()


# Hypothesis: what the schema-driven generator never sends ---------------------------------------------
_TEXT = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=30)  # lone surrogates too
_INTS = st.integers() | st.integers(2**63 - 2, 2**70) | st.integers(-(2**70), -(2**63) + 2)
_JSON = st.recursive(st.none() | st.booleans() | _INTS | st.floats() | _TEXT,  # floats: NaN and Infinity too
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                     max_leaves=8)
_PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}), max_size=3)
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | _JSON,
                                  "content": _TEXT | _PARTS | _JSON})
_FIELDS = ("model", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
           "use_adapter", "use_memory", "conversation_id")
_WILD_CHAT = st.fixed_dictionaries({"messages": st.lists(_MESSAGE, min_size=1, max_size=4) | _JSON},
                                   optional={k: _JSON | _INTS for k in _FIELDS})
_USER = st.fixed_dictionaries({"role": st.just("user"), "content": _TEXT | _PARTS})
_CHAT = _WILD_CHAT | st.fixed_dictionaries(  # mostly valid, so that many get as far as being stored and answered
    {"messages": st.tuples(st.lists(_MESSAGE, max_size=3), _USER).map(lambda t: [*t[0], t[1]])},
    optional={"stream": st.booleans(), "max_tokens": st.integers(-1, 5000) | _INTS, "seed": _INTS,
              "temperature": st.floats() | st.none(), "top_p": st.floats() | st.none(), "use_memory": st.booleans(),
              "conversation_id": st.integers(-1, 40) | _INTS})  # small ids: alice's earlier conversations
_FEEDBACK = st.fixed_dictionaries(
    {"message_id": st.integers(-1, 80) | _INTS | _JSON},
    optional={"feedback": st.sampled_from(["like", "dislike", "clear"]) | _JSON, "correction": _TEXT | _JSON})


def _raw(body: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """JSON text of ``body`` (or of any JSON); now and then nested inside thousands of brackets, cut short, or
    given a field holding a number of thousands of digits."""
    text = (body | _JSON).map(json.dumps)  # ensure_ascii: a lone surrogate goes as its \\ud800 escape
    nested = st.tuples(text, st.integers(1, 5000)).map(lambda t: "[" * t[1] + t[0] + "]" * t[1])
    cut = st.tuples(text, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])])
    long_number = st.tuples(body.map(json.dumps), st.sampled_from([*_FIELDS, "message_id"]), st.integers(1, 6000)).map(
        lambda t: f'{t[0][:-1]}, "{t[1]}": 1{"0" * t[2]}}}')
    return st.one_of(text, text, text, nested, cut, long_number).map(lambda t: t.encode("utf-8", "surrogatepass"))


_LATIN1 = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=40)
_HEADER_VALUE = (_LATIN1 | st.tuples(st.sampled_from(["http://", "https://[", "http://[::1", "http://a:b@", "null"]),
                                     _LATIN1).map("".join)).map(str.strip)  # what HTTP can carry; URL-ish too
_HEADERS = st.dictionaries(st.sampled_from(["Authorization", "Origin", "Cookie", "Accept-Language", "Content-Type",
                                            "Host", "Referer"]), _HEADER_VALUE, max_size=4)
_FORM = st.dictionaries(st.sampled_from(["username", "password", "next"]), st.text(max_size=30), max_size=3)


def _from_hypothesis(srv: Served, session: requests.Session, tally: Tally) -> None:
    bodies = (("chat", "/v1/chat/completions", _raw(_CHAT)), ("feedback", "/v1/feedback", _raw(_FEEDBACK)))
    for name, path, strategy in bodies:

        @settings(FUZZ, max_examples=RAW_EXAMPLES[name])
        @given(raw=strategy, auth=st.sampled_from(AUTHS))
        def post(raw, auth):
            headers = {**srv.headers(auth), "Content-Type": "application/json"}
            tally.send(f"hypothesis {name}", path, f"POST {path} {raw[:300]!r} ({auth})",
                       lambda: session.post(srv.base + path, data=raw, headers=headers, timeout=30))

        post()
    routes = [(m.upper(), p) for p, item in srv.app.openapi()["paths"].items() for m in item]

    @settings(FUZZ, max_examples=RAW_EXAMPLES["headers"])
    @given(route=st.sampled_from(routes), headers=_HEADERS, form=_FORM, auth=st.sampled_from(AUTHS))
    def odd_headers(route, headers, form, auth):
        method, path = route
        headers = srv.headers(auth) | headers
        tally.send("hypothesis headers", path, f"{method} {path} headers={headers} form={form}",
                   lambda: session.request(method, srv.base + path, headers=headers, allow_redirects=False,
                                           data=form if method == "POST" else None, timeout=30))

    odd_headers()


def test_no_server_errors_from_1000_generated_requests(served, capsys):
    tally, started = Tally(), time.monotonic()
    with requests.Session() as session:
        _from_schema(served, session, tally)
        _from_hypothesis(served, session, tally)
    c = tally.counts
    with capsys.disabled():  # shown in every run's output, not only with -s
        print(f"\nAPI fuzz: {tally.requests} requests in {time.monotonic() - started:.0f} s, {c[500]} answered 5xx "
              f"(2xx {c[200]}, 3xx {c[300]}, 4xx {c[400]}, no answer {c['no answer']}); by source: "
              f"{dict(tally.sources)}")
    assert tally.requests >= 1000
    assert not tally.failures, f"{len(tally.failures)} bad answers:\n" + "\n".join(tally.failures[:20])


def test_an_origin_that_is_not_a_url_is_refused_not_a_500(served):
    """Found by the header fuzzing: ``Origin: http://[::1`` (an unclosed IPv6 bracket) made urlsplit raise."""
    for path in ("/auth/signin", "/auth/signup", "/auth/signout"):
        r = requests.post(served.base + path, headers={"Origin": "http://[::1"}, allow_redirects=False, timeout=30)
        assert r.status_code == 403, (path, r.status_code, r.text[:200])
