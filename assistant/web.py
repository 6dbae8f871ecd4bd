"""HTTP helpers shared by the API (``assistant.api``) and the browser's sign-in (``assistant.ui.auth``); no
route, no store."""

from __future__ import annotations


def address_of(request) -> str:
    """The client's address as the server sees it (behind a proxy: the proxy's)."""
    client = getattr(request, "client", None)
    return str(client.host) if client is not None and client.host else ""
