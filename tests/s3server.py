"""A throwaway S3 endpoint for the tests: ``moto_server`` (PyPI ``moto[s3]``) on a free loopback port, objects in its
memory. Started once per test session (``conftest.s3_server``), one fresh bucket per test, stopped by its PID
(SIGTERM, then SIGKILL). The code under test talks to it with plain boto3, as to AWS S3 or MinIO.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path

from postgres import Service, _free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "attune-test", "AWS_SECRET_ACCESS_KEY": "attune-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def credentials_in_env() -> Iterator[None]:
    """``CREDENTIALS`` in this process's environment (so boto3 and spawned processes find them), restored after."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
_buckets = count(1)


def find_moto() -> str | None:
    """The ``moto_server`` next to this interpreter (the venv's), else on PATH, else None."""
    here = Path(sys.executable).parent / "moto_server"
    return str(here) if here.is_file() else shutil.which("moto_server")


class S3Server(Service):
    """``with S3Server(moto) as s3: url = s3.new_bucket()`` (``s3://BUCKET/adapters``); ``s3.endpoint``."""

    def __init__(self, moto: str):
        self.moto, self.port = moto, _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> S3Server:
        self.proc = subprocess.Popen([self.moto, "-H", "127.0.0.1", "-p", str(self.port)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited ({self.proc.returncode}): "
                                   f"{self.proc.stderr.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {timeout:.0f} s")

    def client(self):
        import boto3

        return boto3.session.Session(aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                     aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                     region_name="us-east-1").client("s3", endpoint_url=self.endpoint)

    def new_bucket(self) -> str:
        name = f"attune-{os.getpid()}-{next(_buckets)}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}/adapters"

    def keys(self, url: str) -> list[str]:
        """Every object key in ``url``'s bucket, sorted."""
        bucket = url[len("s3://"):].split("/", 1)[0]
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
