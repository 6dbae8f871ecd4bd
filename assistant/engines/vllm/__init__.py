"""The vLLM engine: a vLLM OpenAI server (started from its own venv, ``server``, or one already running) behind
the same seam (``backend``), with each published adapter loaded at run time (``adapters``).

Must not know: users or SQL (it gets ``AdapterRef``s), the other engines.
"""
