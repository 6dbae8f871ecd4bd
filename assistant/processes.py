"""Operating-system processes by pid: whether one still runs.

Owns process liveness for everything above storage: ``assistant.chat.account`` (stopping a user's training
before forgetting them) and ``personalize.runner`` (failing jobs whose worker died) both ask here.
Must not know jobs, rows or training: callers bring the pid. Lives in ``assistant`` because
``personalize`` may import serving code but serving may never import ``personalize``.
"""

from __future__ import annotations

import os


def pid_alive(pid: int | None) -> bool:
    """True if a process with this pid runs (zombies, killed but not yet reaped, count as dead)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no procfs (macOS): trust kill()
