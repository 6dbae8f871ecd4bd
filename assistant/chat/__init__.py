"""The chat service: one turn end to end (``service``: store the message, resolve the user's adapter, ask
memory, build the prompt inside the context budget, stream the answer, log it), which adapter answers a user
(``adapters``), and whole-account use cases (``account``: forget or import a user).

Must not know: HTTP, Gradio or a concrete engine (it talks to ``engines.base``).
"""
