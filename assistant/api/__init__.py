"""The OpenAI-compatible API at ``/v1``: routes and the API-key cache (``routes``), wire shapes (``protocol``:
parsing, bodies, errors; pure data in, data out).

Must not know: Gradio, a concrete engine or SQL (it calls the chat service).
"""
