"""Serving's own errors: a model, tokenizer, adapter or vLLM server that cannot be found, loaded or reached,
and a published adapter whose files are damaged.

Owns ``ModelError`` and ``AdapterDamaged``. The shared hierarchy (``AttuneError`` and the storage/input/auth
errors) stays in ``storage.errors``; this module must not know training (``personalize`` has ``TrainingError``).
"""

from storage.errors import AttuneError


class ModelError(AttuneError):
    """A model or tokenizer cannot be found or loaded."""


class AdapterDamaged(ModelError):
    """The files of a published adapter version cannot be read or loaded (cut short, garbage, missing).

    ChatService marks that version damaged and answers with the previous one (``assistant.chat.adapters.fall_back``);
    ``what`` says what is wrong, in words."""

    def __init__(self, version: int, path: str, what: str):
        self.version, self.path, self.what = int(version), str(path), what
        super().__init__(f"Your personal version v{self.version} is damaged on disk ({what}; in {self.path}), so "
                         "it can no longer be used. Roll back to another version or train a new one.")
