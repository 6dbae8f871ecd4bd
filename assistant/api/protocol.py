"""The OpenAI wire shapes of the ``/v1`` API: request parsing and validation, response and stream-chunk
bodies, errors. Pure data in, data out: no routes, no store, no engine calls (``assistant.api.routes`` has
the handlers). Attune's extras ride along: ``use_adapter``, ``use_memory`` and ``conversation_id``
in requests, ``system_fingerprint`` and an ``attune`` object in responses.
"""

from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from assistant.chat.service import Turn
from assistant.engines.base import MAX_NEW_TOKENS, SETTING_RANGES, GenerationSettings
from storage.chats import MAX_MESSAGE_CHARS, clean_text
from storage.common import ROLES
from storage.errors import AttuneError, InputError, NotFound

FEEDBACK_VALUES = ("like", "dislike", "clear")
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects in a request body (a chat request needs 5)."""
_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


@dataclass
class APIConfig:
    """Limits on one ``/v1`` request. A request over one is refused before anything is stored or generated,
    with HTTP 413 (the body) or 400 and a message naming the limit and what to send instead."""

    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body in bytes; a larger one is refused (HTTP 413) before it is read."""
    max_messages: int = 512
    """Most messages in one chat request (system, user and assistant together)."""
    max_tokens: int = MAX_NEW_TOKENS
    """Largest max_tokens (or max_completion_tokens) one chat request may ask for."""

    def __post_init__(self):
        for name, low, high in (("max_body_bytes", 1024, 2**30), ("max_messages", 1, 100_000),
                                ("max_tokens", 1, MAX_NEW_TOKENS)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name}: must be an integer from {low:,} to {high:,}, got {value!r}")


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


def body_too_large(limit: int, size: int | None = None) -> str:
    """The 413 message: the size (when the client said it), the limit and what to send instead."""
    said = f"is {size:,} bytes" if size is not None else f"is over {limit:,} bytes"
    return (f"The request body {said}; this server reads at most {limit:,} bytes (its --api-max-body-bytes). "
            "Send less: shorter messages, or continue a logged conversation with 'conversation_id' and only "
            "the new message.")


def decode_json(raw: bytes) -> Any:
    """A request body (already within the size limit) as JSON; InputError when it is not UTF-8 JSON or is
    nested deeper than MAX_JSON_DEPTH."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"The request body is not valid UTF-8 JSON: {e}.") from None
    except ValueError:  # an integer of more than 4,300 digits
        raise InputError("The request body has a number too long to read; send numbers of at most 4,300 "
                         "digits.") from None
    except RecursionError:
        raise InputError(_too_deep()) from None
    if _depth(body) > MAX_JSON_DEPTH:
        raise InputError(_too_deep())
    return body


def _too_deep() -> str:
    return f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} deep; send a flatter body."


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in ``value`` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:
                stack.extend((child, level + 1) for child in children)
    return deepest


def _content(value: Any, where: str) -> str:
    """OpenAI content: a string or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in value):
        text = "".join(p["text"] for p in value)
    else:
        raise InputError(f"{where}.content must be a string or a list of text parts.")
    if len(text) > MAX_MESSAGE_CHARS:
        raise InputError(f"{where}.content is {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}. "
                         "Split it into parts.")
    return text


def _messages(msgs: Any, limit: int) -> list[dict]:
    """Every message checked before any is stored; the last one (the user's new message) cleaned as the
    engine stores it, so it is neither empty nor unstorable."""
    if not isinstance(msgs, list) or not msgs:
        raise InputError("'messages' must be a non-empty list of {role, content} objects.")
    if len(msgs) > limit:
        raise InputError(f"'messages' has {len(msgs):,} messages; this server takes at most {limit:,} in one "
                         "request (its --api-max-messages). Send only the recent ones, or continue a logged "
                         "conversation with 'conversation_id' and only the new message.")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"messages[{i}].role must be one of {', '.join(ROLES)}.")
        messages.append({"role": m["role"], "content": _content(m.get("content"), f"messages[{i}]")})
    if messages[-1]["role"] != "user":
        raise InputError("The last message must have role 'user'.")
    messages[-1]["content"] = clean_text(messages[-1]["content"])
    return messages


def _max_tokens(body: dict, default: int, limit: int) -> int:
    """The answer's token budget: the request's max_completion_tokens (or max_tokens) up to ``limit``, else
    the server's default (capped by ``limit`` too)."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is None:
        return min(default, limit)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"'{key}' must be a whole number of tokens from 1 to {limit:,}.")
    if value > limit:
        raise InputError(f"'{key}' is {value:,}; this server answers with at most {limit:,} tokens (its "
                         f"--api-max-tokens). Ask for {limit:,} or fewer, or leave it out for the default "
                         f"({min(default, limit):,}).")
    return value


def parse_chat_request(body: Any, defaults: GenerationSettings, limits: APIConfig | None = None) -> ChatRequest:
    """Validate a chat-completions body; every InputError names the field and what to send instead."""
    limits = limits or APIConfig()
    if not isinstance(body, dict):
        raise InputError("The request body must be a JSON object.")
    messages = _messages(body.get("messages"), limits.max_messages)
    if body.get("n") not in (None, 1):
        raise InputError("Only n=1 is supported.")
    for flag in ("stream", "use_adapter", "use_memory"):
        if flag in body and not isinstance(body[flag], bool):
            raise InputError(f"'{flag}' must be true or false.")
    cid = body.get("conversation_id")
    if cid is not None and (not isinstance(cid, int) or isinstance(cid, bool)):
        raise InputError("'conversation_id' must be an integer from an earlier response's attune.conversation_id.")
    settings = GenerationSettings.from_request(
        defaults, max_new_tokens=_max_tokens(body, defaults.max_new_tokens, limits.max_tokens),
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
        raise NotFound(f"Message {reprlib.repr(mid)} does not exist (or is not yours).")
    return FeedbackRequest(message_id=mid, feedback=fb, correction=corr)


# the request bodies, for the OpenAPI schema (the parsers above are what enforces them) ---------
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"enum": list(ROLES)},
    "content": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": _TEXT_PART}]}}}


def chat_request_schema(limits: APIConfig) -> dict:
    """The JSON schema of a ``POST /v1/chat/completions`` body under ``limits``."""
    tokens = {"type": ["integer", "null"], "minimum": SETTING_RANGES["max_new_tokens"][0], "maximum": limits.max_tokens}
    low, high = ({k: v[i] for k, v in SETTING_RANGES.items()} for i in (0, 1))
    return {"type": "object", "required": ["messages"], "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "maxItems": limits.max_messages, "items": _MESSAGE},
        "stream": {"type": "boolean"},
        "max_tokens": tokens,
        "max_completion_tokens": tokens,
        "temperature": {"type": ["number", "null"], "minimum": low["temperature"], "maximum": high["temperature"]},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": low["top_p"], "maximum": high["top_p"]},
        "seed": {"type": ["integer", "null"], "minimum": low["seed"], "maximum": high["seed"]},
        "n": {"const": 1},
        "use_adapter": {"type": "boolean"},
        "use_memory": {"type": "boolean"},
        "conversation_id": {"type": ["integer", "null"]}}}


def feedback_schema() -> dict:
    """The JSON schema of a ``POST /v1/feedback`` body."""
    return {"type": "object", "required": ["message_id"], "properties": {
        "message_id": {"type": "integer"},
        "feedback": {"enum": [*FEEDBACK_VALUES, None]},
        "correction": {"type": ["string", "null"]}}}


def openapi_body(schema: dict) -> dict:
    """``openapi_extra`` for a route that reads a JSON body of ``schema`` itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# responses -------------------------------------------------------------------------------------
def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_for(e: AttuneError) -> JSONResponse:
    response = error(e.status, str(e), _ERROR_TYPES.get(e.status, "invalid_request_error" if e.status < 500
                                                         else "server_error"))
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
            "memory_ids": turn.memory_ids, "truncated": turn.truncated, "status": turn.status,
            "notice": turn.notice}


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
