"""Browser sessions for the UI: the sign-in page, the sign-in / sign-up / sign-out endpoints, the
session cookie, and the guard in front of every Gradio route.

Signing in creates a row in ``sessions`` (only a hash of the id is stored) and hands the id to the
browser in an HttpOnly, SameSite=Strict cookie. Every page load and every UI event derives the
user from that cookie on the server (``WebAuth.user``); Gradio's own ``auth_dependency`` refuses
all of its routes without a live session. Signing out revokes the row and the browser reloads to
the empty sign-in page. Uploads are refused everywhere: Attune takes no files.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from assistant.ui.i18n import lang_of, tr, tr_error
from assistant.web import address_of
from storage.db import Store
from storage.errors import AttuneError, AuthError, TooManyAttempts
from storage.users import User

log = logging.getLogger("attune.auth")
COOKIE = "attune_session"
SIGNIN_PATH = "/signin"
FORM_MAX_BYTES = 16 * 1024
"""Largest sign-in or sign-up form body (a name and a password need well under 1 KiB); a larger one is refused
with HTTP 413 before it is parsed, so no body is held in memory whole."""
UPLOAD_SUFFIXES = ("/gradio_api/upload", "/gradio_api/upload/", "/gradio_api/upload_progress")


@dataclass
class SessionConfig:
    """How long a browser stays signed in, and who may create an account."""

    days: float = 14.0
    """A session ends this many days after sign-in (or at sign-out, or when the password changes)."""
    allow_signup: bool = True
    """Show "Create account" on the sign-in page and accept new accounts."""

    def __post_init__(self):
        if not isinstance(self.days, int | float) or not 0 < self.days <= 366:
            raise ValueError(f"days: must be more than 0 and at most 366, got {self.days!r}")


class WebAuth:
    def __init__(self, store: Store, config: SessionConfig | None = None):
        self.store = store
        self.config = config or SessionConfig()

    # who is asking ---------------------------------------------------------------------------
    def token(self, request) -> str | None:
        cookies = getattr(request, "cookies", None) or {}
        return cookies.get(COOKIE)

    def user(self, request) -> User | None:
        """The signed-in user of a FastAPI or ``gr.Request``, from the session cookie; None without one."""
        return self.store.sessions.user(self.token(request)) if request is not None else None

    def require(self, request) -> User:
        user = self.user(request)
        if user is None:
            raise AuthError(tr(lang_of(request), "session_ended"))
        return user

    def dependency(self, request: Request) -> str | None:
        """Gradio's ``auth_dependency``: the user name of a live session, else None (Gradio answers 401)."""
        user = self.user(request)
        return user.name if user else None

    # the HTTP side ---------------------------------------------------------------------------
    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route(SIGNIN_PATH, self.signin_page, methods=["GET"], response_class=HTMLResponse)
        r.add_api_route("/auth/signin", self.signin, methods=["POST"])
        r.add_api_route("/auth/signup", self.signup, methods=["POST"])
        r.add_api_route("/auth/signout", self.signout, methods=["POST"])
        r.add_api_route("/account/export", self.export, methods=["GET"])
        return r

    def guard(self, app):
        """ASGI middleware: no uploads at all; the app page without a session goes to the sign-in page.
        (Plain ASGI, not ``BaseHTTPMiddleware``, so streamed responses pass through untouched.)"""

        async def middleware(scope, receive, send):
            if scope["type"] == "http":
                request = Request(scope)
                path = scope["path"]
                if path.endswith(UPLOAD_SUFFIXES):
                    response = JSONResponse({"error": "Attune takes no files: uploads are turned off."},
                                            status_code=403)
                    return await response(scope, receive, send)
                if path == "/" and scope["method"] in ("GET", "HEAD") and self.user(request) is None:
                    return await RedirectResponse(SIGNIN_PATH, status_code=303)(scope, receive, send)
            await app(scope, receive, send)

        return middleware

    def signin_page(self, request: Request) -> Response:
        if self.user(request) is not None:
            return RedirectResponse("/", status_code=303)
        return self._page(request, "", "", 200)

    async def signin(self, request: Request) -> Response:
        return await self._enter(request, create=False)

    async def signup(self, request: Request) -> Response:
        return await self._enter(request, create=True)

    async def signout(self, request: Request) -> Response:
        if not _same_origin(request):
            return JSONResponse({"error": "Cross-site request refused."}, status_code=403)
        self.store.sessions.revoke(self.token(request))
        response = RedirectResponse(SIGNIN_PATH, status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    def export(self, request: Request) -> Response:
        """All of the session user's data as a JSON download (what ``launch.py export`` prints)."""
        from storage.transfer import export_user

        user = self.user(request)
        if user is None:
            return JSONResponse({"error": tr(lang_of(request), "session_ended")}, status_code=401)
        body = json.dumps(export_user(self.store, user.id), ensure_ascii=False, indent=1, default=str)
        return Response(body, media_type="application/json", headers={
            "Content-Disposition": f'attachment; filename="attune-{user.name}.json"', "Cache-Control": "no-store"})

    async def _enter(self, request: Request, create: bool) -> Response:
        lang = lang_of(request)
        if not _same_origin(request):
            return self._page(request, "", tr(lang, "cross_site"), 403)
        if not await _bounded(request, FORM_MAX_BYTES):
            return self._page(request, "", tr(lang, "form_too_large"), 413)
        form = await request.form()
        name, password = str(form.get("username") or ""), str(form.get("password") or "")
        address = address_of(request)
        try:
            if create:
                if not self.config.allow_signup:
                    return self._page(request, name, tr(lang, "signup_closed"), 403)
                self.store.users.create(name, password)
            else:
                self.store.throttle.check_password(name, address)
            user = self.store.users.authenticate(name, password)
        except TooManyAttempts as e:
            page = self._page(request, name, tr(lang, "too_many_attempts", minutes=e.minutes), 429)
            page.headers["Retry-After"] = str(e.retry_after)
            return page
        except AttuneError as e:
            if isinstance(e, AuthError) and not create:
                self.store.throttle.failed_password(name, address)
            return self._page(request, name, tr_error(lang, e), e.status if e.status < 500 else 400)
        if not create:
            self.store.throttle.signed_in(name)
        return self.start_session(request, user)

    def start_session(self, request: Request, user: User) -> Response:
        token = self.store.sessions.create(user.id, timedelta(days=self.config.days))
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, max_age=int(self.config.days * 86400), path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response

    def _page(self, request: Request, name: str, message: str, status: int) -> HTMLResponse:
        lang = lang_of(request)
        first_run = self.config.allow_signup and self.store.users.count() == 0
        return HTMLResponse(signin_html(lang, name, message, first_run, self.config.allow_signup),
                            status_code=status, headers={"Cache-Control": "no-store"})


async def _bounded(request: Request, limit: int) -> bool:
    """Read the body only up to ``limit`` bytes: False as soon as the declared length or the bytes received pass
    it; else the body is kept on the request for ``request.form()``."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        return False
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return False
        chunks.append(chunk)
    request._body = b"".join(chunks)  # Starlette's cache of the body: form() parses it from there
    return True


def _same_origin(request: Request) -> bool:
    """A form post must come from this server's own pages (login CSRF); no Origin header is allowed
    (old browsers, scripts), since the session cookie is SameSite=Strict anyway."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # not a URL at all (e.g. an unclosed IPv6 bracket): not one of ours
        return False
    return netloc == request.headers.get("host", "")


def signin_html(lang: str, name: str, message: str, first_run: bool, allow_signup: bool) -> str:
    def t(key: str) -> str:
        return html.escape(tr(lang, key))

    first = f'<p id="first-run" class="note">{t("first_run_html")}</p>' if first_run else ""
    signup = (f'<button id="signup-btn" type="submit" formaction="/auth/signup">{t("create_account")}</button>'
              if allow_signup else "")
    msg = f'<p id="login-msg" role="alert">⚠️ {html.escape(message)}</p>' if message else '<p id="login-msg"></p>'
    return f"""<!doctype html>
<html lang="{html.escape(lang)}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Attune</title><style>{SIGNIN_CSS}</style></head>
<body><main><form method="post" action="/auth/signin" autocomplete="on">
<h1>Attune</h1><p class="tagline">{t("tagline")}</p>{first}
<label for="username">{t("username")}</label>
<input id="username" name="username" autocomplete="username" autocapitalize="off" spellcheck="false"
 maxlength="32" required autofocus value="{html.escape(name)}">
<label for="password">{t("password")}</label>
<input id="password" name="password" type="password" autocomplete="current-password" required maxlength="1024">
<div class="buttons"><button id="signin-btn" class="primary" type="submit">{t("sign_in")}</button>{signup}</div>
{msg}</form></main></body></html>"""


SIGNIN_CSS = """
:root{color-scheme:light dark;--bg:#f7f7f8;--card:#fff;--fg:#1f2328;--muted:#59636e;--line:#d0d7de;--accent:#ea580c}
@media (prefers-color-scheme:dark){:root{--bg:#0f1115;--card:#1a1d23;--fg:#e6e6e6;--muted:#9aa4ae;--line:#30363d}}
*{box-sizing:border-box}
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;background:var(--bg);
 color:var(--fg);font:16px/1.5 ui-sans-serif,system-ui,sans-serif}
main{width:100%;max-width:380px;padding:16px}
form{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:28px 24px;
 display:flex;flex-direction:column;gap:6px}
h1{margin:0;font-size:28px}
.tagline{margin:0 0 10px;color:var(--muted)}
.note{margin:0 0 8px;padding:8px 10px;border-radius:8px;background:rgba(234,88,12,.1)}
label{font-size:14px;color:var(--muted);margin-top:6px}
input{font:inherit;padding:10px 12px;border:1px solid var(--line);border-radius:8px;background:none;color:inherit}
input:focus{outline:2px solid var(--accent);outline-offset:0}
.buttons{display:flex;gap:10px;margin-top:14px;flex-wrap:wrap}
button{font:inherit;flex:1;padding:10px 14px;border-radius:8px;border:1px solid var(--line);background:transparent;
 color:inherit;cursor:pointer;white-space:nowrap}
button.primary{background:var(--accent);border-color:var(--accent);color:#fff}
#login-msg{margin:8px 0 0;min-height:1.5em;color:#d1242f}
"""
