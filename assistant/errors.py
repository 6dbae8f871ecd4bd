"""Serving's own errors: a model, tokenizer, adapter or vLLM server that cannot be found, loaded or reached,
a published adapter whose files are damaged, and one that cannot be downloaded from the adapter store right now.

Owns ``ModelError``, ``AdapterDamaged`` and ``AdapterUnavailable``. The shared hierarchy (``AttuneError`` and the
storage/input/auth errors) stays in ``storage.errors``; this module must not know training (``personalize`` has
``TrainingError``).
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


class AdapterUnavailable(ModelError):
    """A published version kept in the adapter store (``--adapter-store``) that this server does not hold yet could
    not be downloaded (the store did not answer, or refused): nothing is wrong with the version itself.

    ChatService answers this turn with an older version it holds (else the base model) and tries again on the next
    turn; ``what`` says what went wrong, in words."""

    def __init__(self, version: int, location: str, what: str):
        self.version, self.location, self.what = int(version), str(location), what
        super().__init__(f"Your personal version v{self.version} could not be downloaded from {self.location} "
                         f"({what}); it is tried again on your next turn.")
