"""The data-dir layout (one root for all state) and atomic file/folder publish."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from storage.errors import StorageError

ENV_VAR = "ATTUNE_DATA_DIR"
DEFAULT_DIR = Path.home() / ".attune"
STAGING_PREFIX = ".staging-j"
"""A training job's adapter folder before publish: ``adapters/u<id>/.staging-j<job>``."""


def default_data_dir() -> Path:
    """``$ATTUNE_DATA_DIR`` if set, else ``~/.attune``."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


@dataclass(frozen=True)
class DataDir:
    """All of Attune's state lives below ``root``. User ids in paths are internal integers."""

    root: Path

    def __post_init__(self):
        if not str(self.root):
            raise ValueError("root: the data dir must be a non-empty path")
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    def ensure(self) -> DataDir:
        try:
            for sub in ("models", "adapters", "memory", "replay"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"Cannot create the data dir {self.root}: {e}. Pick another with --data-dir.") from e
        return self

    @property
    def db_path(self) -> Path:
        return self.root / "attune.db"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def replay(self) -> Path:
        return self.root / "replay"

    def adapters(self, user_id: int) -> Path:
        return self.root / "adapters" / _uid(user_id)

    def staging(self, user_id: int, job_id: int) -> Path:
        """Where job ``job_id`` writes its adapter before publish (never a version until renamed)."""
        return self.adapters(user_id) / f"{STAGING_PREFIX}{int(job_id)}"

    def memory_index(self, user_id: int) -> Path:
        return self.root / "memory" / f"{_uid(user_id)}.faiss"

    def user_files(self, user_id: int) -> list[Path]:
        """Every file and folder under the data dir that belongs to one user (adapters, memory index and
        its sidecars), whatever wrote them: what forgetting the user deletes."""
        memory = sorted((self.root / "memory").glob(f"{_uid(user_id)}.*"))
        return [self.adapters(user_id), *memory]


def _uid(user_id: int) -> str:
    if not isinstance(user_id, int) or isinstance(user_id, bool) or user_id <= 0:
        raise ValueError(f"user_id must be a positive integer, got {user_id!r}")
    return f"u{user_id}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written folder into place: fsync its files, then one rename.

    ``final`` must not exist yet (versions are never overwritten).
    """
    if final.exists():
        raise StorageError(f"{final} already exists; versions are never overwritten.")
    for p in staging.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(staging)
    os.rename(staging, final)
    fsync_dir(final.parent)


def remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
