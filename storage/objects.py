"""The adapter store (``--adapter-store``): where published adapter versions are kept besides the data dir, so
that training on one machine and serving on others share them.

Owns: :class:`AdapterStoreConfig`, the small :class:`ObjectStore` interface and its two kinds, a folder
(``file:///FOLDER``, e.g. a network mount) and S3 (``s3://BUCKET/PREFIX`` through boto3, imported only for such a
URL; AWS, MinIO, Ceph or moto alike); the completion marker written last on upload; the files manifest (bytes and
SHA-256 of each file) and verified, all-or-nothing downloads into a local folder. Empty (the default): no adapter
store, versions live only in the data dir's ``adapters/`` folder, as before it existed.

Must not know: what the files are (peft, GGUF), models, engines, users (a key is a path it is given). Errors:
:class:`ObjectsIncomplete` (the stored objects are not a whole upload: no marker, a file missing or different)
versus :class:`ObjectStoreUnavailable` (the store cannot be reached or refuses us; try again later).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from storage.errors import StorageError
from storage.paths import atomic_write_bytes, publish_dir, remove_tree

MARKER = "_COMPLETE.json"
"""The completion marker: the manifest of an upload, written after every file. No marker, no version."""
SCHEMES = ("s3", "file")


class ObjectsIncomplete(StorageError):
    """The objects under a key are not one whole upload (no completion marker, a file missing, cut short or
    changed): what they held cannot be served."""


class ObjectStoreUnavailable(StorageError):
    """The adapter store cannot be reached or refuses the request (network, credentials, permissions, bucket)."""


@dataclass(frozen=True)
class AdapterStoreConfig:
    """Where published adapter versions are kept (``launch.py ... --adapter-store URL``)."""

    adapter_store: str = ""
    """where training uploads each published adapter version and serving downloads it on first use:
    s3://BUCKET/PREFIX (boto3; credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws or an instance role)
    or file:///FOLDER (a shared mount); empty: only the data dir's adapters/ folder"""
    s3_endpoint: str = ""
    """the S3 API's URL when it is not AWS (MinIO, Ceph, moto: http://HOST:PORT); empty: AWS_ENDPOINT_URL, else
    AWS"""

    def __post_init__(self):
        for name in ("adapter_store", "s3_endpoint"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: must be a URL string, got {type(getattr(self, name)).__name__}")
            object.__setattr__(self, name, getattr(self, name).strip().rstrip("/"))
        if self.adapter_store:
            scheme, _, rest = self.adapter_store.partition("://")
            if scheme.lower() not in SCHEMES or not rest.strip("/"):
                raise ValueError(f"adapter_store: {self.adapter_store!r} is not an adapter store Attune knows; use "
                                 "s3://BUCKET/PREFIX or file:///FOLDER (or leave --adapter-store out for the data "
                                 "dir's adapters/ folder)")
        if self.s3_endpoint and urlsplit(self.s3_endpoint).scheme not in ("http", "https"):
            raise ValueError(f"s3_endpoint: {self.s3_endpoint!r} is not an http(s):// URL; give the S3 API's address, "
                             "e.g. http://127.0.0.1:9000, or leave it empty for AWS_ENDPOINT_URL / AWS")

    def open(self) -> ObjectStore | None:
        """The configured store, or None when there is none (the default)."""
        return open_store(self.adapter_store, self.s3_endpoint) if self.adapter_store else None


def open_store(url: str, s3_endpoint: str = "") -> ObjectStore:
    """The store rooted at ``url`` (``s3://BUCKET/KEY`` or ``file:///FOLDER``); a version's row keeps its own URL,
    so any process can read it back whatever its ``--adapter-store``."""
    parts = urlsplit(url)
    if parts.scheme == "s3" and parts.netloc:
        return S3Store(parts.netloc, parts.path.strip("/"), s3_endpoint)
    if parts.scheme == "file" and parts.path:
        return FolderStore(Path(unquote(parts.path)))
    raise StorageError(f"{url!r} is not an adapter store URL (s3://BUCKET/PREFIX or file:///FOLDER).")


def manifest_of(folder: Path) -> dict[str, dict]:
    """``{relative name: {"bytes": n, "sha256": hex}}`` of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safe_name(name: Any) -> str:
    """A manifest entry as a relative path that stays inside the folder it is written to."""
    path = PurePosixPath(str(name))
    if not str(name) or path.is_absolute() or ".." in path.parts or name == MARKER:
        raise ObjectsIncomplete(f"the manifest names {name!r}, which is not a file of an adapter version")
    return str(path)


class ObjectStore:
    """Objects under one root (``url``). Subclasses give five primitives; uploads, markers, verified downloads and
    deletes are the same for every kind."""

    url: str

    def child(self, key: str) -> ObjectStore:
        raise NotImplementedError

    def _put(self, name: str, source: Path) -> None:
        raise NotImplementedError

    def _put_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def _get(self, name: str, target: Path) -> bool:
        """Copy object ``name`` to ``target``; False when there is no such object."""
        raise NotImplementedError

    def _get_bytes(self, name: str) -> bytes | None:
        """Object ``name``'s bytes (a small one: the marker); None when there is no such object."""
        raise NotImplementedError

    def _names(self) -> list[str]:
        raise NotImplementedError

    def _remove(self, names: list[str]) -> None:
        raise NotImplementedError

    def upload(self, folder: Path) -> dict[str, dict]:
        """Upload every file under ``folder``, then the completion marker; returns the manifest."""
        files = manifest_of(Path(folder))
        if not files:
            raise StorageError(f"{folder} holds no files; nothing to upload.")
        for name in files:
            self._put(name, Path(folder) / name)
        self._put_bytes(MARKER, json.dumps({"files": files}, sort_keys=True).encode())
        return files

    def manifest(self) -> dict[str, dict] | None:
        """The completed upload's manifest, or None when its marker is absent (never uploaded, or not finished)."""
        raw = self._get_bytes(MARKER)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            raise ObjectsIncomplete(f"{self.url}/{MARKER} is not a manifest (not JSON)") from None
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict) or not files:
            raise ObjectsIncomplete(f"{self.url}/{MARKER} lists no files")
        return files

    def download(self, dest: Path, expected: dict[str, dict] | None = None) -> dict[str, dict]:
        """Fetch a completed upload into the new folder ``dest``, all or nothing: every file of ``expected`` (what
        the version's row recorded; else the marker's manifest) with its size and SHA-256 checked, then one rename.
        Another thread or process that fetched it first wins; returns the manifest."""
        marker = self.manifest()
        if marker is None:
            raise ObjectsIncomplete(f"{self.url} has no completion marker ({MARKER}): its upload never finished")
        files = expected or marker
        dest = Path(dest)
        tmp = dest.parent / f".fetch-{dest.name}-{os.getpid()}-{threading.get_ident()}"
        remove_tree(tmp)
        try:
            for name, want in files.items():
                target = tmp / _safe_name(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not self._get(name, target):
                    raise ObjectsIncomplete(f"{name} is missing from {self.url}")
                size, digest = target.stat().st_size, _sha256(target)
                if size != want.get("bytes") or digest != want.get("sha256"):
                    raise ObjectsIncomplete(f"{name} in {self.url} is not what was published ({size:,} bytes, "
                                            f"sha256 {digest[:12]}…; expected {want.get('bytes'):,} bytes, "
                                            f"{str(want.get('sha256'))[:12]}…)")
            try:
                publish_dir(tmp, dest)
            except (StorageError, OSError):
                if not dest.is_dir():  # else another fetch of this version renamed its copy first: as good
                    raise
        finally:
            remove_tree(tmp)
        return files

    def children(self) -> list[str]:
        """The keys directly under this root that hold objects (``child(key)`` for each), sorted."""
        return sorted({name.split("/", 1)[0] for name in self._names() if "/" in name})

    def delete(self) -> int:
        """Delete every object under this root (the marker first, so a half-deleted version is never whole);
        returns how many there were."""
        names = self._names()
        if MARKER in names:
            self._remove([MARKER])
        rest = [n for n in names if n != MARKER]
        for i in range(0, len(rest), 1000):
            self._remove(rest[i:i + 1000])
        return len(names)


class FolderStore(ObjectStore):
    """Objects as files under a folder (``file:///FOLDER``): a network mount every machine sees."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = self.root.as_uri()

    def child(self, key: str) -> FolderStore:
        return FolderStore(self.root / key.strip("/"))

    def _put(self, name: str, source: Path) -> None:
        self._put_bytes(name, source.read_bytes())

    def _put_bytes(self, name: str, data: bytes) -> None:
        try:
            atomic_write_bytes(self.root / name, data)
        except OSError as e:
            raise ObjectStoreUnavailable(f"Cannot write {self.root / name}: {e}. Check that the adapter store's "
                                         "folder is mounted and writable.") from e

    def _get(self, name: str, target: Path) -> bool:
        try:
            shutil.copyfile(self.root / name, target)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise ObjectStoreUnavailable(f"Cannot read {self.root / name}: {e}. Check that the adapter store's "
                                         "folder is mounted and readable.") from e
        return True

    def _get_bytes(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ObjectStoreUnavailable(f"Cannot read {self.root / name}: {e}. Check that the adapter store's "
                                         "folder is mounted and readable.") from e

    def _names(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()] \
            if self.root.is_dir() else []

    def _remove(self, names: list[str]) -> None:
        for name in names:
            (self.root / name).unlink(missing_ok=True)

    def delete(self) -> int:
        """As :meth:`ObjectStore.delete`, and the folders left empty go too."""
        n = super().delete()
        if self.root.is_dir() and not any(p.is_file() for p in self.root.rglob("*")):
            remove_tree(self.root)
        return n


class S3Store(ObjectStore):
    """Objects in an S3 bucket under a key prefix, through boto3 (imported on first use)."""

    def __init__(self, bucket: str, prefix: str, endpoint: str = ""):
        self.bucket, self.prefix, self.endpoint = bucket, prefix.strip("/"), endpoint
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = None

    def child(self, key: str) -> S3Store:
        return S3Store(self.bucket, f"{self.prefix}/{key.strip('/')}".strip("/"), self.endpoint)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client(self.endpoint)
        return self._client

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)``, with boto3's errors said in words (a missing object is the caller's business:
        ``NoSuchKey``/404 comes back as ``None``)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise ObjectStoreUnavailable(f"The adapter store refused to {what} ({code}: {e}). Check the bucket "
                                         f"{self.bucket!r} exists and these credentials may use it.") from e
        except (BotoCoreError, OSError) as e:
            raise ObjectStoreUnavailable(f"Cannot {what} ({type(e).__name__}: {e}). Check that the S3 endpoint "
                                         f"({self.endpoint or os.environ.get('AWS_ENDPOINT_URL') or 'AWS'}) is "
                                         "reachable and credentials are set.") from e

    def _put(self, name: str, source: Path) -> None:
        self._call(f"upload {self.url}/{name}", self.client.upload_file, str(source), self.bucket, self._key(name))

    def _put_bytes(self, name: str, data: bytes) -> None:
        self._call(f"upload {self.url}/{name}", self.client.put_object, Bucket=self.bucket, Key=self._key(name),
                   Body=data)

    def _get(self, name: str, target: Path) -> bool:
        done = self._call(f"download {self.url}/{name}", lambda: self.client.download_file(
            self.bucket, self._key(name), str(target)) or True)
        if not done:
            Path(target).unlink(missing_ok=True)
        return bool(done)

    def _get_bytes(self, name: str) -> bytes | None:
        got = self._call(f"download {self.url}/{name}", self.client.get_object, Bucket=self.bucket,
                         Key=self._key(name))
        return None if got is None else self._call(f"download {self.url}/{name}", got["Body"].read)

    def _names(self) -> list[str]:
        names, start = [], f"{self.prefix}/" if self.prefix else ""
        pages = self._call(f"list {self.url}", lambda: list(
            self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start))) or []
        for page in pages:
            names += [o["Key"][len(start):] for o in page.get("Contents", [])]
        return names

    def _remove(self, names: list[str]) -> None:
        if names:
            self._call(f"delete objects under {self.url}", self.client.delete_objects, Bucket=self.bucket,
                       Delete={"Objects": [{"Key": self._key(n)} for n in names], "Quiet": True})


_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def s3_client(endpoint: str = "") -> Any:
    """One boto3 S3 client per endpoint (thread-safe; credentials from boto3's usual chain)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StorageError('An s3:// adapter store needs boto3, which is not installed: run `make setup` (or '
                           '.venv/bin/pip install boto3), or leave --adapter-store out to keep adapters in the data '
                           'dir.') from None
    with _clients_lock:
        if endpoint not in _clients:
            config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
            _clients[endpoint] = boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=config)
        return _clients[endpoint]
