"""The OpenAI-compatible HTTP API at ``/v1``: chat completions (JSON and SSE streaming), models,
feedback. The Bearer API key decides the user; every read and write is scoped to that user.

This module holds the handlers; the wire shapes (parsing, bodies, errors) are in ``assistant.api.protocol``.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from assistant.api import protocol
from assistant.api.protocol import APIConfig, ChatRequest, error, error_for
from assistant.chat.service import ChatService, Turn, TurnOptions
from assistant.web import address_of
from storage.errors import CLI, AttuneError, AuthError, InputError, TooLarge


class KeyCache:
    """Verified API keys -> user id, so scrypt runs once per key rather than once per request."""

    def __init__(self, store, size: int = 1024):
        self.store, self.size = store, size
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def user_id(self, request: Request) -> int:
        """The key's user; a bad key counts against the client's address (``storage.throttle``)."""
        address = address_of(request)
        self.store.throttle.check_key(address)
        header = request.headers.get("authorization", "")
        try:
            return self._user_id(header)
        except AuthError as e:
            if header.strip():
                self.store.throttle.failed_key(address)
            if self.store.users.count() == 0:  # a fresh install: there is nobody to make a key for yet
                raise AuthError(f"No user exists yet. Add one with: {CLI} users add NAME, then create an API key "
                                f"with: {CLI} users key NAME") from e
            raise

    def _user_id(self, header: str) -> int:
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise AuthError(f"Missing API key: send 'Authorization: Bearer <key>'. Create one with: {CLI} users key "
                            "NAME")
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


class ChatAPI:
    """The handlers behind ``/v1``, one method per route."""

    def __init__(self, chat: ChatService, config: APIConfig | None = None):
        self.chat = chat
        self.config = config or APIConfig()
        self.store = chat.store
        self.keys = KeyCache(chat.store)

    def models(self, request: Request):
        try:
            self.keys.user_id(request)
        except AttuneError as e:
            return error_for(e)
        return {"object": "list", "data": [{"id": self.chat.backend.name, "object": "model", "created": 0,
                                            "owned_by": "attune"}]}

    async def chat_completions(self, request: Request):
        try:
            user_id = self.keys.user_id(request)
            req = protocol.parse_chat_request(await self._json(request), self.chat.config.defaults, self.config)
        except AttuneError as e:
            return error_for(e)
        created, model = int(time.time()), self.chat.backend.name
        if not req.stream:
            return await self._complete(user_id, req, created, model)
        stop = threading.Event()
        try:
            stream = await _in_thread(lambda: _primed(self._generate(user_id, req, stop)))
        except AttuneError as e:
            return error_for(e)
        return StreamingResponse(_pumped(_events(stream, created, model), stop), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def feedback(self, request: Request):
        try:
            user_id = self.keys.user_id(request)
            fb = protocol.parse_feedback(await self._json(request))
            ids = []
            if fb.feedback is not None:
                ids.append(self.chat.feedback(user_id, fb.message_id, fb.feedback, source="api"))
            if fb.correction is not None:
                ids.append(self.chat.feedback(user_id, fb.message_id, "correction", fb.correction, source="api"))
        except AttuneError as e:
            return error_for(e)
        return {"ok": True, "message_id": fb.message_id, "feedback_ids": ids,
                "state": self.store.chats.feedback_state(user_id, fb.message_id)}

    # internals ---------------------------------------------------------------------------------
    async def _json(self, request: Request):
        """The body as JSON, read only up to ``max_body_bytes``: TooLarge (413) as soon as the declared length
        or the bytes received pass it, so an endless or huge body is never held in memory."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise TooLarge(protocol.body_too_large(limit, int(declared)))
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise TooLarge(protocol.body_too_large(limit))
                chunks.append(chunk)
        except ClientDisconnect:
            raise InputError("The client went away before sending the whole body.") from None
        return protocol.decode_json(b"".join(chunks))

    async def _complete(self, user_id: int, req: ChatRequest, created: int, model: str):
        try:
            turns = await _in_thread(lambda: list(self._generate(user_id, req)))
        except AttuneError as e:
            return error_for(e)
        turn = turns[-1]
        if turn.status == "error":
            return error(500, turn.error or "Generation failed.", "server_error")
        return protocol.completion(turn, created, model)

    def _generate(self, user_id: int, req: ChatRequest, stop: threading.Event | None = None) -> Iterator[Turn]:
        cid = self.chat.post_messages(user_id, req.conversation_id, req.messages, source="api")
        return self.chat.answer(user_id, cid, TurnOptions(req.settings, stop, source="api",
                                                          use_adapter=req.use_adapter, use_memory=req.use_memory))


def build_router(chat: ChatService, config: APIConfig | None = None) -> APIRouter:
    """The ``/v1`` routes over one ChatService, with ``config``'s limits (and those limits in the OpenAPI schema)."""
    api = ChatAPI(chat, config)
    router = APIRouter(prefix="/v1")
    router.add_api_route("/models", api.models, methods=["GET"])
    router.add_api_route("/chat/completions", api.chat_completions, methods=["POST"],
                         openapi_extra=protocol.openapi_body(protocol.chat_request_schema(api.config)))
    router.add_api_route("/feedback", api.feedback, methods=["POST"],
                         openapi_extra=protocol.openapi_body(protocol.feedback_schema()))
    routes = {r.path: sorted(r.methods) for r in router.routes}
    router.add_api_route("/{rest:path}", _unknown(routes), include_in_schema=False,
                         methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    return router


def _unknown(routes: dict[str, list[str]]):
    """Any other ``/v1`` path or method: 404 or 405 in the API's error shape, naming what exists."""
    offered = ", ".join(f"{m} {p}" for p, methods in routes.items() for m in methods)

    async def unknown(request: Request):
        path = request.url.path
        if path in routes:
            return error(405, f"{path} does not take {request.method}; it takes {', '.join(routes[path])}. "
                              f"The API offers: {offered}.", code="method_not_allowed")
        return error(404, f"There is no {path} in this API. It offers: {offered}.", "not_found_error",
                     code="unknown_url")

    return unknown


def _events(stream: Iterator[Turn], created: int, model: str) -> Iterator[str]:
    """The SSE events of a streamed turn: a role chunk, one chunk per new text, the final chunk, [DONE]."""
    sent, turn, chunk_id, fp, first = 0, None, "chatcmpl-stream", "attune-base", True
    for turn in stream:
        fp = protocol.fingerprint(turn)
        if first:
            chunk_id, first = f"chatcmpl-u{turn.user_message_id}", False
            yield protocol.chunk(chunk_id, created, model, fp, {"role": "assistant", "content": ""})
        if len(turn.text) > sent:
            yield protocol.chunk(chunk_id, created, model, fp, {"content": turn.text[sent:]})
            sent = len(turn.text)
    if turn is not None:
        if turn.status == "error":
            yield protocol.sse(protocol.error_body(turn.error, "server_error"))
        yield protocol.chunk(chunk_id, created, model, fp, {}, protocol.finish_reason(turn),
                             {"attune": protocol.attune_info(turn), "usage": protocol.usage(turn)})
    yield protocol.SSE_DONE


async def _pumped(events: Iterator[str], stop: threading.Event) -> AsyncIterator[str]:
    """The events of a streamed answer, produced on a thread of their own and handed to the event loop as they
    come: one hand-off per event, not a thread-pool round trip per ``next()`` (what a plain iterator given to
    StreamingResponse costs), and whatever piled up while the client was being written to goes out as one write.
    A client that goes away sets ``stop``: the engine ends the answer, stored as stopped with what it has."""
    loop, ready = asyncio.get_running_loop(), asyncio.Queue()
    gone = threading.Event()

    def hand(item) -> None:
        if gone.is_set():
            return  # the answer ends (stop is set) and is stored by the stream itself
        try:
            loop.call_soon_threadsafe(ready.put_nowait, item)
        except RuntimeError:  # the event loop closed under us (the server is going away): end the answer
            gone.set()
            stop.set()

    def pump():
        try:
            for event in events:
                hand(event)
        except Exception as e:  # raised in the response (logged, the connection closed) as any handler error is
            hand(e)
        hand(None)

    threading.Thread(target=pump, name="attune-sse", daemon=True).start()
    try:
        while True:
            parts = [await ready.get()]
            while not ready.empty() and parts[-1] is not None and not isinstance(parts[-1], Exception):
                parts.append(ready.get_nowait())
            end = parts[-1] is None or isinstance(parts[-1], Exception)
            text = "".join(parts[:-1] if end else parts)
            if text:
                yield text
            if isinstance(parts[-1], Exception):
                raise parts[-1]
            if end:
                return
    finally:
        gone.set()
        stop.set()


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
