"""The HTTP server: one FastAPI app with the Gradio UI at ``/`` (the OpenAI-compatible API joins
at ``/v1``), loading the model once and serving until interrupted."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from assistant.api.protocol import APIConfig
from assistant.chat.service import ChatConfig, ChatService
from assistant.engines.select import build_backend
from assistant.model import ModelConfig
from storage.db import Store
from storage.errors import CLI, AttuneError

log = logging.getLogger("attune.server")
SHUTDOWN_GRACE_S = 1  # seconds open connections (e.g. the UI's event stream) get before they are closed


@dataclass
class ServerConfig:
    """Where and how the server listens."""

    host: str = "127.0.0.1"
    """Interface to bind; anything but loopback exposes Attune to the network (sign-in is always required)."""
    port: int = 7860
    """TCP port for the UI and the API."""
    personalizer: bool = True
    """Run the background personalizer (per-user adapter training)."""
    allow_signup: bool | None = None
    """Let anyone create an account from the sign-in page. None: only when bound to loopback."""

    def __post_init__(self):
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0-65535, got {self.port!r}")
        if not self.host or not self.host.strip():
            raise ValueError("host: must not be empty")


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def check_exposure(store: Store, cfg: ServerConfig) -> bool:
    """Whether sign-up is open. On a non-loopback address Attune refuses to start with no account
    (anyone could walk in) and closes sign-up unless it was asked for explicitly."""
    if is_loopback(cfg.host):
        return True if cfg.allow_signup is None else cfg.allow_signup
    if store.users.count() == 0 and not cfg.allow_signup:
        raise AttuneError(
            f"Refusing to listen on {cfg.host} with no accounts: anyone on the network could create one. "
            f"Create users first ({CLI} users add NAME), or pass --allow-signup deliberately.")
    return bool(cfg.allow_signup)


def build_app(chat: ChatService, allow_signup: bool = True, runner=None, train_after: int | None = None,
              api_cfg: APIConfig | None = None):
    """The FastAPI app: ``/v1`` (API keys; ``api_cfg``'s limits), the sign-in page and ``/auth/*`` (open), and
    the Gradio UI at ``/``, every route of which needs a live browser session (Gradio's ``auth_dependency``)."""
    import gradio as gr
    from fastapi import FastAPI

    from assistant.api.routes import build_router
    from assistant.ui.app import ChatUI, UIConfig
    from assistant.ui.auth import SessionConfig, WebAuth
    from assistant.ui.layout import CSS, JS, build_layout, theme

    app = FastAPI(title="Attune", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(build_router(chat, api_cfg))
    auth = WebAuth(chat.store, SessionConfig(allow_signup=allow_signup))
    app.include_router(auth.router())
    app.add_middleware(_Guard, auth=auth)

    @app.get("/healthz")
    def healthz():
        return {"ok": True, "model": chat.backend.name}

    ui = ChatUI(chat, auth, UIConfig(train_after=train_after if runner is not None else None), runner=runner)
    app.state.ui = ui
    blocks = build_layout(ui)
    quiet_queue(blocks)
    # Routes must be registered before Gradio is mounted at "/".
    return gr.mount_gradio_app(app, blocks, path="/", theme=theme(), css=CSS, js=JS, i18n=ui.i18n,
                               ssr_mode=False, footer_links=[], show_error=True, auth_dependency=auth.dependency,
                               max_file_size=1)


QUEUE_POLL_S = 0.02
"""How often Gradio's event queue looks for new UI events, and for progress to send, while it has none."""


def quiet_queue(blocks) -> None:
    """Gradio's event queue polls every 1 ms for new events and every 10 ms for progress (its Linux defaults): over a
    thousand wake-ups a second of the event loop, even with nobody in the UI. On a small CPU each one takes a core
    from the engine's decode threads, which run in lockstep on every core (llama.cpp): on a 2-core VM one answer
    through the API decoded at 74 tok/s with it and 80-83 without (a scratch A/B, commit 5a1b21a; the bench's API
    rows: BENCHMARKS.md, "Speed through the API"). Polling every ``QUEUE_POLL_S``
    instead starts a UI event at most that much later. A Gradio without these settings is served as it is, with a
    warning (tests/test_api.py checks they are set)."""
    queue = getattr(blocks, "_queue", None)
    for name in ("sleep_when_free", "progress_update_sleep_when_free"):
        value = getattr(queue, name, None)
        if not isinstance(value, int | float):
            log.warning("Gradio's queue has no %s setting: it polls at its own rate (update assistant.server."
                        "quiet_queue for this Gradio version)", name)
            continue
        setattr(queue, name, max(value, QUEUE_POLL_S))


class _Guard:
    """``WebAuth.guard`` as a Starlette middleware class."""

    def __init__(self, app, auth):
        self.asgi = auth.guard(app)

    async def __call__(self, scope, receive, send):
        await self.asgi(scope, receive, send)


def serve(store: Store, model_cfg: ModelConfig, chat_cfg: ChatConfig, server_cfg: ServerConfig,
          memory_cfg=None, start_personalizer: Callable[[], tuple] | None = None, vllm_cfg=None,
          engine: str = "auto", llamacpp_cfg=None, api_cfg: APIConfig | None = None) -> None:
    """Load the model (and the memory embedder unless ``memory_cfg`` is None), then serve until interrupted.
    ``start_personalizer`` starts the background personalizer and returns its (job runner, scheduler): the
    caller composes it (``launch.py``), serving never imports ``personalize``; it runs only when
    ``server_cfg.personalizer``; the UI shows its scheduler's trigger (``config.min_new_events``). ``vllm_cfg``
    (a ``VLLMConfig``) hands generation to vLLM instead of this process; else ``engine`` (:data:`ENGINES`).
    ``api_cfg``: the ``/v1`` request limits (defaults when None)."""
    allow_signup = check_exposure(store, server_cfg)
    if not is_loopback(server_cfg.host):
        log.warning("Listening on %s: Attune is reachable from the network; every user must sign in "
                    "(sign-up %s).", server_cfg.host, "open" if allow_signup else "closed")
    backend = build_backend(store.data_dir, model_cfg, chat_cfg.context_tokens, vllm_cfg, engine, llamacpp_cfg)
    memory = None
    if memory_cfg is not None:
        from assistant.memory.service import MemoryService

        memory = MemoryService(store, memory_cfg)
        memory.warm_up()  # load the embedder now, not on the first message
    chat = ChatService(store, backend, chat_cfg, memory)
    runner = scheduler = None
    if server_cfg.personalizer and start_personalizer is not None:
        runner, scheduler = start_personalizer()
    train_after = scheduler.config.min_new_events if scheduler is not None else None
    app = build_app(chat, allow_signup, runner, train_after, api_cfg)
    store.sessions.purge()  # expired and revoked sessions
    print(f"attune: open http://{server_cfg.host}:{server_cfg.port}/ (Ctrl+C to stop)", flush=True)
    server = _Server(uvicorn.Config(app, host=server_cfg.host, port=server_cfg.port, log_level="warning",
                                    timeout_graceful_shutdown=SHUTDOWN_GRACE_S), chat)
    # uvicorn re-raises the signal it caught once it has shut down: make SIGTERM, like SIGINT, an exception
    # here, so the cleanup below (stop jobs, save the memory indexes) runs instead of an instant exit.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    signalled = False
    try:
        server.run()
    except KeyboardInterrupt:
        signalled = True
    except OSError as e:
        raise AttuneError(f"Cannot listen on {server_cfg.host}:{server_cfg.port}: {e}. Try another --port.") from e
    finally:
        signal.signal(signal.SIGTERM, previous)
        chat.shutdown()  # every answer in flight is stored (as stopped)
        chat.backend.close()
        if scheduler is not None:
            scheduler.stop()
        if memory is not None:
            memory.close()  # save unsaved index changes
        print("attune: stopped", flush=True)
    if signalled:
        # Everything is committed and saved above. Tearing down torch, gradio and transformers modules
        # takes seconds more on a busy machine; a stop signal must end the process promptly.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)


def _interrupt(sig, frame):
    raise KeyboardInterrupt


class _Server(uvicorn.Server):
    """uvicorn, plus: the first SIGTERM or SIGINT stops every answer being generated, so open streams end
    and shutdown takes seconds (each answer is stored as stopped), not the length of an answer."""

    def __init__(self, config: uvicorn.Config, chat: ChatService):
        super().__init__(config)
        self.chat = chat

    def handle_exit(self, sig, frame) -> None:
        self.chat.backend.cancel_all()
        super().handle_exit(sig, frame)
