"""The root of Attune's error hierarchy and the errors of storage, input and auth. Every message says what to do next.

Lives in ``storage`` because every other package already depends on it; it imports nothing. Must not know
models or training: ``ModelError`` lives in ``assistant.errors``, ``TrainingError`` in ``personalize.errors``.
"""

CLI = ".venv/bin/python launch.py"
"""How a person runs Attune's command line (as README.md writes it); error hints use it."""


class AttuneError(Exception):
    """Base class: an error a person can act on. ``str(err)`` is shown to users as is."""

    status = 500


class InputError(AttuneError):
    """Bad input from a user or a file (empty, too long, malformed, wrong type)."""

    status = 400


class TooLarge(InputError):
    """A request over a size limit (a body too large to read): HTTP 413."""

    status = 413


class AuthError(AttuneError):
    """Wrong password, unknown user or API key, or a request for someone else's data."""

    status = 401


class TooManyAttempts(AuthError):
    """Too many wrong passwords or API keys lately: wait ``retry_after`` seconds (HTTP 429)."""

    status = 429

    def __init__(self, retry_after: int):
        self.retry_after = int(retry_after)
        self.minutes = max(1, -(-self.retry_after // 60))
        """The wait in whole minutes, rounded up."""
        super().__init__(f"Too many failed attempts. Try again in {self.minutes} minute"
                         f"{'s' if self.minutes > 1 else ''}.")


class NotFound(AttuneError):
    """An id that does not exist for this user (other users' ids look exactly the same)."""

    status = 404


class StorageError(AttuneError):
    """The data dir or database cannot be used (permissions, disk full, corrupt file)."""
