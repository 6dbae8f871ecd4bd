"""Learning's own error: a training job that cannot run or failed.

Owns ``TrainingError``. The shared hierarchy (``AttuneError`` and the storage/input/auth errors) stays in
``storage.errors``; this module must not know serving (``assistant.errors`` has ``ModelError``).
"""

from storage.errors import AttuneError


class TrainingError(AttuneError):
    """A training job cannot run or failed."""
