"""Use cases on a whole account, above storage: forget a user, import a user's history.

Forgetting touches three owners, in this order: the user's training process (a job must not train on,
or publish from, data being deleted), the memory service (its loaded index and index files), and
storage (rows, then every file of the user's under the data dir). Storage only deletes rows and
files; this module knows about processes (liveness from ``assistant.processes``) and memory.
Knows nothing of torch or training code.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.processes import pid_alive
from storage.transfer import delete_user, import_history

if TYPE_CHECKING:
    from assistant.memory.service import MemoryService
    from storage.db import Store

STOP_TIMEOUT_S = 20.0
"""How long a training process gets to exit after SIGTERM before it is killed."""


def stop_training(store: Store, user_id: int, timeout: float = STOP_TIMEOUT_S) -> list[int]:
    """SIGTERM the user's open training job processes, wait for them, SIGKILL what is left.

    Returns the pids that were signalled. This process is never signalled (a foreground ``train``
    records its own pid). A job a ``launch.py worker`` holds runs on that worker's machine, where its pid means
    nothing here: it is left to the worker, which stops it at its next lease renewal once the row is gone.
    """
    pids = [job["pid"] for job in store.jobs.open_jobs(user_id) if not job.get("worker_id")]
    pids = [pid for pid in pids if pid and pid != os.getpid() and pid_alive(pid)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if pid_alive(pid):
            _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # it exited between the check and the signal: that is what we want
        pass


def forget_user(store: Store, user_id: int, memory: MemoryService | None = None) -> None:
    """Delete everything Attune holds about one user: stop their training, drop their memory (index
    and rows), delete their rows and files, VACUUM. ``memory`` is the running service when there is
    one (so a loaded index is dropped too); without it the files are deleted all the same."""
    store.users.by_id(user_id)  # NotFound before anything is stopped
    stop_training(store, user_id)
    if memory is not None:
        memory.forget_all(user_id)
    delete_user(store, user_id)


def import_user_history(store: Store, user_id: int, path: Path, memory: MemoryService | None = None) -> dict:
    """Add a JSONL history for the user (all or nothing), then derive memories from it when ``memory``
    is given. Returns counts: conversations, messages, feedback (and memories)."""
    counts = import_history(store, user_id, path)
    if memory is not None:
        counts["memories"] = memory.backfill(user_id)["added"]
    return counts
