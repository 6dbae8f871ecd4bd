"""Engines: who turns token ids into text. ``base`` is the seam every engine implements (``ChatBackend``,
``GenerationSettings``, ``StreamStats``, ``QueuedBackend``, ``AdapterRef``); ``select`` decides and starts
the engine for ``--engine``; one folder per engine: ``hf`` (transformers in this process), ``llamacpp``
(llama.cpp in this process, the fast CPU path), ``vllm`` (a vLLM server).

Must not know: users, conversations, memory, the UI or the API. Engines get token ids and an adapter reference,
never a user; an engine folder imports only ``engines.base``, ``assistant.model`` and ``assistant.errors``,
never another engine (``select`` alone names them).
"""
