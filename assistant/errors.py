"""Serving's own error: a model, tokenizer, adapter or vLLM server that cannot be found, loaded or reached.

Owns ``ModelError``. The shared hierarchy (``AttuneError`` and the storage/input/auth errors) stays in
``storage.errors``; this module must not know training (``personalize`` has ``TrainingError``).
"""

from storage.errors import AttuneError


class ModelError(AttuneError):
    """A model or tokenizer cannot be found or loaded."""
