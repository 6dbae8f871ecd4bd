"""Learning: turning each user's log into their own LoRA adapter, safely.

Owns: the training dataset built from a user's conversations and feedback (corrections replace
answers, likes weigh more, dislikes are never targets but rejected sides and undesirable
examples), replay (the per-user reservoir and the general anchor set answered by the base
model), LoRA/QLoRA training with SFT + DPO + KTO-style losses, the evaluation gate, atomic
publish of versions, the job worker process, the job runner, the background scheduler and
``TrainingError`` (``errors``).

Must not know: gradio, the HTTP server, ChatService or how adapters are served. It reads and
writes only through ``storage`` (SQLite rows and data-dir paths) and loads the base model with
``assistant.model``. Entry points for the CLI and the server are in :mod:`personalize.api`.
"""
