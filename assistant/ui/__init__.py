"""The browser: the Gradio chat UI (``app``: handlers; ``layout``: the page; ``render``: chat and list views;
``tabs/``: Memory, Personal, Account, Compare), the sign-in pages and sessions (``auth``) and the UI's
languages (``i18n``, ``i18n_personal``).

Must not know: a concrete engine or SQL beyond the store's use cases; every read is scoped to the user of the
request's session.
"""
