"""The OpenAI wire shapes of the ``/v1`` API: request parsing and validation, response and stream-chunk
bodies, errors. Pure data in, data out: no routes, no store, no engine calls (``assistant.api`` has
the handlers). Attune's extras ride along: ``use_adapter``, ``use_memory`` and ``conversation_id``
in requests, ``system_fingerprint`` and an ``attune`` object in responses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from assistant.backend import GenerationSettings
from assistant.engine import Turn
from storage.common import ROLES
from storage.errors import AttuneError, InputError, NotFound

MAX_BODY_BYTES = 4 * 1024 * 1024
FEEDBACK_VALUES = ("like", "dislike", "clear")
_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 400: "invalid_request_error",
                429: "rate_limit_error"}


# requests --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body."""

    messages: list[dict]
    """``{"role", "content"}`` with text content; the last one is the user's."""
    stream: bool
    settings: GenerationSettings
    use_adapter: bool
    use_memory: bool
    conversation_id: int | None
    """Continue this logged conversation (only the last message is new) instead of starting one."""


@dataclass(frozen=True)
class FeedbackRequest:
    """A validated ``POST /v1/feedback`` body."""

    message_id: int
    feedback: str | None
    correction: str | None


def decode_json(raw: bytes) -> Any:
    """A request body as JSON; InputError when it is too large or not UTF-8 JSON."""
    if len(raw) > MAX_BODY_BYTES:
        raise InputError(f"The request body is {len(raw):,} bytes; the limit is {MAX_BODY_BYTES:,}.")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"The request body is not valid UTF-8 JSON: {e}.") from None


def _content(value: Any, where: str) -> str:
    """OpenAI content: a string or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise InputError(f"{where}.content must be a string or a list of text parts.")


def _messages(msgs: Any) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise InputError("'messages' must be a non-empty list of {role, content} objects.")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"messages[{i}].role must be one of {', '.join(ROLES)}.")
        messages.append({"role": m["role"], "content": _content(m.get("content"), f"messages[{i}]")})
    if messages[-1]["role"] != "user":
        raise InputError("The last message must have role 'user'.")
    return messages


def parse_chat_request(body: Any, defaults: GenerationSettings) -> ChatRequest:
    """Validate a chat-completions body; every InputError names the field and what to send instead."""
    if not isinstance(body, dict):
        raise InputError("The request body must be a JSON object.")
    messages = _messages(body.get("messages"))
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
    return ChatRequest(messages=messages, stream=body.get("stream", False), settings=settings,
                       use_adapter=body.get("use_adapter", True), use_memory=body.get("use_memory", True),
                       conversation_id=cid)


def parse_feedback(body: Any) -> FeedbackRequest:
    """Validate a feedback body: ``{message_id, feedback?, correction?}`` with at least one of the two."""
    if not isinstance(body, dict) or "message_id" not in body:
        raise InputError("Send {message_id, feedback?: 'like'|'dislike'|null, correction?: text}.")
    fb, corr = body.get("feedback"), body.get("correction")
    if fb is None and corr is None:
        raise InputError("Give 'feedback' ('like' or 'dislike') and/or a 'correction'.")
    if fb is not None and fb not in FEEDBACK_VALUES:
        raise InputError("'feedback' must be 'like', 'dislike' or 'clear'.")
    mid = body["message_id"]
    if not isinstance(mid, int) or isinstance(mid, bool):
        raise NotFound(f"Message {mid!r} does not exist (or is not yours).")
    return FeedbackRequest(message_id=mid, feedback=fb, correction=corr)


# responses -------------------------------------------------------------------------------------
def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_for(e: AttuneError) -> JSONResponse:
    response = error(e.status, str(e), _ERROR_TYPES.get(e.status, "server_error"))
    if getattr(e, "retry_after", None):
        response.headers["Retry-After"] = str(e.retry_after)
    return response


def fingerprint(turn: Turn) -> str:
    return f"attune-adapter-v{turn.adapter_version}" if turn.adapter_version else "attune-base"


def finish_reason(turn: Turn) -> str:
    return "length" if turn.stats.finish_reason == "length" else "stop"


def usage(turn: Turn) -> dict:
    prompt, completion = turn.stats.prompt_tokens, turn.stats.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def attune_info(turn: Turn) -> dict:
    """Attune's extra response object: where the turn was logged and what personalized it."""
    return {"conversation_id": turn.conversation_id, "message_id": turn.assistant_message_id,
            "user_message_id": turn.user_message_id, "adapter_version": turn.adapter_version,
            "memory_ids": turn.memory_ids, "truncated": turn.truncated, "status": turn.status}


def completion(turn: Turn, created: int, model: str) -> dict:
    """The ``chat.completion`` body of a finished turn."""
    return {"id": f"chatcmpl-{turn.assistant_message_id}", "object": "chat.completion", "created": created,
            "model": model, "system_fingerprint": fingerprint(turn),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": turn.text},
                         "finish_reason": finish_reason(turn)}],
            "usage": usage(turn), "attune": attune_info(turn)}


def sse(body: dict) -> str:
    """One server-sent event carrying ``body``."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def chunk(chunk_id: str, created: int, model: str, fp: str, delta: dict, finish: str | None = None,
          extra: dict | None = None) -> str:
    """One ``chat.completion.chunk`` event."""
    body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fp, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return sse(body | (extra or {}))
