"""Serving: everything between a signed-in user and the model's answer, in rooms:

- ``engines/``: the engine seam (``engines.base``), the choice of engine (``engines.select``) and one folder per
  engine (``hf``, ``llamacpp``, ``vllm``);
- ``memory/``: personal memory (embedder, per-user FAISS, policy, the service);
- ``chat/``: the chat service (one turn end to end), adapter resolution, whole-account use cases;
- ``api/``: the OpenAI-compatible API; ``ui/``: the Gradio UI, sign-in and languages;
- at the top: the composition root (``server``), the base model (``model``), file checks shared with training
  (``file_checks``), process liveness (``processes``), HTTP helpers (``web``) and serving's errors (``errors``).

Must not know: how adapters are trained (it only reads published versions from ``storage``; the job
runner it may start jobs with is composed in ``launch.py`` and handed to it). All state goes through
``storage``.
"""

import logging

# bitsandbytes tries to fetch a faster CPU 4-bit kernel from the Hugging Face hub at import and logs a
# warning when it cannot (always, offline); Attune does not serve through that kernel (see model.resolve_quant).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
