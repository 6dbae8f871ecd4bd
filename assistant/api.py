"""The OpenAI-compatible HTTP API at ``/v1``: chat completions (JSON and SSE streaming), models,
feedback. The Bearer API key decides the user; every read and write is scoped to that user."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from assistant.backend import GenerationSettings
from assistant.engine import ChatEngine, Turn
from storage.errors import AttuneError, AuthError, InputError, NotFound

MAX_BODY_BYTES = 4 * 1024 * 1024
ROLES = ("system", "user", "assistant")


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def error_for(e: AttuneError) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 400: "invalid_request_error"}
    return error(e.status, str(e), kind.get(e.status, "server_error"))


class KeyCache:
    """Verified API keys -> user id, so scrypt runs once per key rather than once per request."""

    def __init__(self, store, size: int = 1024):
        self.store, self.size = store, size
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def user_id(self, request: Request) -> int:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise AuthError("Missing API key: send 'Authorization: Bearer <key>'. "
                            "Create one with: python launch.py users key NAME")
        key = header[7:].strip()
        digest = hashlib.sha256(key.encode()).hexdigest()
        with self._lock:
            cached = digest in self._cache
            if cached:
                self._cache.move_to_end(digest)
                user_id = self._cache[digest]
        if cached:  # a revoked key (or a forgotten user's) stops working at once
            if self.store.users.api_key_live(key.split("-", 2)[1]):
                return user_id
            with self._lock:
                self._cache.pop(digest, None)
        user = self.store.users.by_api_key(key)
        with self._lock:
            self._cache[digest] = user.id
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return user.id


def _content(value: Any, where: str) -> str:
    """OpenAI content: a string or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise InputError(f"{where}.content must be a string or a list of text parts.")


def parse_request(body: Any, defaults: GenerationSettings) -> dict:
    if not isinstance(body, dict):
        raise InputError("The request body must be a JSON object.")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InputError("'messages' must be a non-empty list of {role, content} objects.")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"messages[{i}].role must be one of {', '.join(ROLES)}.")
        messages.append({"role": m["role"], "content": _content(m.get("content"), f"messages[{i}]")})
    if messages[-1]["role"] != "user":
        raise InputError("The last message must have role 'user'.")
    if body.get("n", 1) != 1:
        raise InputError("Only n=1 is supported.")
    for flag in ("stream", "use_adapter", "use_memory"):
        if flag in body and not isinstance(body[flag], bool):
            raise InputError(f"'{flag}' must be true or false.")
    cid = body.get("conversation_id")
    if cid is not None and (not isinstance(cid, int) or isinstance(cid, bool)):
        raise InputError("'conversation_id' must be an integer from an earlier response's attune.conversation_id.")
    settings = GenerationSettings.from_request(
        defaults, max_new_tokens=body.get("max_completion_tokens", body.get("max_tokens")),
        temperature=body.get("temperature"), top_p=body.get("top_p"), seed=body.get("seed"))
    return {"messages": messages, "stream": body.get("stream", False), "settings": settings,
            "use_adapter": body.get("use_adapter", True), "use_memory": body.get("use_memory", True),
            "conversation_id": cid}


def build_router(engine: ChatEngine) -> APIRouter:
    store = engine.store
    keys = KeyCache(store)
    router = APIRouter(prefix="/v1")

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise InputError(f"The request body is {len(raw):,} bytes; the limit is {MAX_BODY_BYTES:,}.")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"The request body is not valid UTF-8 JSON: {e}.") from None

    def start_turn(user_id: int, req: dict) -> int:
        """Log the request's messages: a new conversation (all messages) or an existing one (last only)."""
        cid = req["conversation_id"]
        if cid is not None:
            store.chats.conversation(user_id, cid)  # NotFound for someone else's id
            engine.post(user_id, cid, req["messages"][-1]["content"], source="api")
            return cid
        *earlier, last = req["messages"]
        cid = store.chats.create_conversation(user_id, title=last["content"], source="api")
        for m in earlier:
            if m["content"].strip():
                store.chats.add_message(user_id, cid, m["role"], m["content"], source="api")
        engine.post(user_id, cid, last["content"], source="api")
        return cid

    def attune_info(turn: Turn) -> dict:
        return {"conversation_id": turn.conversation_id, "message_id": turn.assistant_message_id,
                "user_message_id": turn.user_message_id, "adapter_version": turn.adapter_version,
                "memory_ids": turn.memory_ids, "truncated": turn.truncated, "status": turn.status}

    def fingerprint(turn: Turn) -> str:
        return f"attune-adapter-v{turn.adapter_version}" if turn.adapter_version else "attune-base"

    def finish_reason(turn: Turn) -> str:
        return "length" if turn.stats.finish_reason == "length" else "stop"

    @router.get("/models")
    def models(request: Request):
        try:
            keys.user_id(request)
        except AttuneError as e:
            return error_for(e)
        return {"object": "list", "data": [{"id": engine.backend.name, "object": "model", "created": 0,
                                            "owned_by": "attune"}]}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            user_id = keys.user_id(request)
            req = parse_request(await read_json(request), engine.config.defaults)
        except AttuneError as e:
            return error_for(e)
        created = int(time.time())
        model = engine.backend.name

        def generate() -> Iterator[Turn]:
            cid = start_turn(user_id, req)
            return engine.answer(user_id, cid, req["settings"], source="api", use_adapter=req["use_adapter"],
                                 use_memory=req["use_memory"])

        if not req["stream"]:
            try:
                turn = None
                for turn in await _in_thread(lambda: list(generate())):
                    pass
            except AttuneError as e:
                return error_for(e)
            if turn.status == "error":
                return error(500, turn.error or "Generation failed.", "server_error")
            return {"id": f"chatcmpl-{turn.assistant_message_id}", "object": "chat.completion", "created": created,
                    "model": model, "system_fingerprint": fingerprint(turn),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": turn.text},
                                 "finish_reason": finish_reason(turn)}],
                    "usage": {"prompt_tokens": turn.stats.prompt_tokens,
                              "completion_tokens": turn.stats.completion_tokens,
                              "total_tokens": turn.stats.prompt_tokens + turn.stats.completion_tokens},
                    "attune": attune_info(turn)}

        try:
            stream = await _in_thread(lambda: _primed(generate()))
        except AttuneError as e:
            return error_for(e)

        def sse() -> Iterator[str]:
            sent, turn = 0, None
            chunk_id = "chatcmpl-stream"

            def chunk(delta: dict, finish: str | None = None, extra: dict | None = None) -> str:
                body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "system_fingerprint": fp, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                return f"data: {json.dumps(body | (extra or {}), ensure_ascii=False)}\n\n"

            fp = "attune-base"
            first = True
            for turn in stream:
                fp = fingerprint(turn)
                if first:
                    chunk_id = f"chatcmpl-u{turn.user_message_id}"
                    yield chunk({"role": "assistant", "content": ""})
                    first = False
                if len(turn.text) > sent:
                    yield chunk({"content": turn.text[sent:]})
                    sent = len(turn.text)
            if turn is not None:
                if turn.status == "error":
                    err = {"error": {"message": turn.error, "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                yield chunk({}, finish_reason(turn), {"attune": attune_info(turn), "usage": {
                    "prompt_tokens": turn.stats.prompt_tokens, "completion_tokens": turn.stats.completion_tokens,
                    "total_tokens": turn.stats.prompt_tokens + turn.stats.completion_tokens}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/feedback")
    async def feedback(request: Request):
        try:
            user_id = keys.user_id(request)
            body = await read_json(request)
            if not isinstance(body, dict) or "message_id" not in body:
                raise InputError("Send {message_id, feedback?: 'like'|'dislike'|null, correction?: text}.")
            fb, corr = body.get("feedback"), body.get("correction")
            if fb is None and corr is None:
                raise InputError("Give 'feedback' ('like' or 'dislike') and/or a 'correction'.")
            if fb is not None and fb not in ("like", "dislike", "clear"):
                raise InputError("'feedback' must be 'like', 'dislike' or 'clear'.")
            mid = body["message_id"]
            if not isinstance(mid, int) or isinstance(mid, bool):
                raise NotFound(f"Message {mid!r} does not exist (or is not yours).")
            ids = []
            if fb is not None:
                ids.append(engine.feedback(user_id, mid, fb, source="api"))
            if corr is not None:
                ids.append(engine.feedback(user_id, mid, "correction", corr, source="api"))
        except AttuneError as e:
            return error_for(e)
        return {"ok": True, "message_id": mid, "feedback_ids": ids,
                "state": store.chats.feedback_state(user_id, mid)}

    return router


def _primed(stream: Iterator[Turn]) -> Iterator[Turn]:
    """Run the generator to its first item now (so validation errors become HTTP errors), then resume."""
    first = next(stream)

    def rest():
        yield first
        yield from stream

    return rest()


async def _in_thread(fn):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn)
