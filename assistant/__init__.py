"""Serving: everything between a signed-in user and the model's answer.

Owns: finding, converting and loading the base model with its quantization (``model``), the
per-user adapter registry with LRU and hot reload (``adapters``), the generation worker behind the
chat-backend seam (``backend``) with continuous batching (``continuous``) and rows of different adapters
in one pass (``lora_rows``), ChatEngine (prompt,
memory injection, context budget, streaming, logging; ``engine``), personal memory (embedder seam,
per-user FAISS, policy, the service; ``embedder``, ``memory_index``, ``memory_cache``, ``memory_policy``,
``memory_text``, ``memory``), the Gradio UI (``ui``, ``ui_layout``,
``ui_render``, ``ui_tabs``, ``ui_memory``, ``ui_personal``, ``ui_account``, ``i18n``), the
OpenAI-compatible API (handlers in ``api``, wire shapes in ``protocol``), the HTTP server (``server``),
whole-account use cases above storage (``account``: forget or import a user), process liveness
(``processes``) and serving's error (``errors``: ModelError).

Must not know: how adapters are trained (it only reads published versions from ``storage``; the job
runner it may start jobs with is composed in ``launch.py`` and handed to it). All state goes through
``storage``.
"""

import logging

# bitsandbytes tries to fetch a faster CPU 4-bit kernel from the Hugging Face hub at import and logs a
# warning when it cannot (always, offline); Attune does not serve through that kernel (see model.resolve_quant).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
