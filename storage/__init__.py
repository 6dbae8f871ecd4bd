"""Attune's storage: the SQLite schema and its append-only migrations (and PostgreSQL's, ``storage.postgres``, for
``--db postgresql://...``), typed reads and writes, the data-dir layout, password/API-key hashing, atomic file
publish and the adapter store (``storage.objects``: published versions in S3 or a shared folder, ``--adapter-store``).

Owns: everything on disk under the data dir except what other packages write through
``DataDir`` paths. Must not know: torch, transformers, gradio, faiss. Every read of user data
takes the signed-in user's id and is scoped to it.
"""

from storage.db import Store
from storage.errors import AttuneError, AuthError, InputError, NotFound, StorageError
from storage.paths import DataDir

__all__ = ["AttuneError", "AuthError", "DataDir", "InputError", "NotFound", "StorageError", "Store"]
