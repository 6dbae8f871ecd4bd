"""A throwaway PostgreSQL server for the tests: Debian's binaries, a temporary folder, loopback only.

Started once per test session (``conftest.postgres_server``), one fresh database per test (``createdb`` takes
about 30 ms), stopped with ``pg_ctl stop -m fast`` and then by its PID, and its folder removed. PostgreSQL refuses to
run as root: as root the server runs as the ``postgres`` user (``runuser``), which owns the folder.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from itertools import count
from pathlib import Path

from helpers import alive

USER = "attune"
_numbers = count(1)


def find_bin() -> Path | None:
    """The folder holding initdb and pg_ctl (the newest /usr/lib/postgresql/N/bin, else PATH), or None."""
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                     if Path(p).parent.name.isdigit() else 0, reverse=True)
    for folder in folders:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A server a test starts: ``with X(...) as server`` starts it, and stops it (by PID) on the way out, also when
    starting failed half-way. Subclasses give ``start()`` (returning self) and ``stop()``."""

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class PostgresServer(Service):
    """``with PostgresServer(bin_dir) as pg: url = pg.new_database()``."""

    def __init__(self, bin_dir: Path):
        self.bin = Path(bin_dir)
        self.root = Path(tempfile.mkdtemp(prefix="attune-pg-"))
        self.port = _free_port()
        self.pid: int | None = None
        self._migrated = ""
        self._as = []
        if os.geteuid() == 0:  # PostgreSQL refuses root: run it as postgres, owning its folder
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str) -> None:
        done = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def start(self) -> PostgresServer:
        data = self.root / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", USER, "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-sync")
        options = (f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(self.root / "log"),
                  "-o", options, "start")
        self.pid = int((data / "postmaster.pid").read_text().split()[0])
        return self

    @property
    def admin_url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def url(self, name: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def new_database(self, migrated: bool = False) -> str:
        """A new database, empty or (``migrated``) a copy of one Attune's migrations ran on; returns its URL.
        Copies take about 30 ms where running the migrations takes about 250."""
        import psycopg

        name = f"t{os.getpid()}_{next(_numbers)}"
        template = f" TEMPLATE {self._template()}" if migrated else ""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}{template}")
        return self.url(name)

    def _template(self) -> str:
        if not self._migrated:
            from storage import Store

            url = self.new_database()
            Store(self.root / "template-data", url).close()  # runs the migrations; no connection may stay open
            self._migrated = url.rsplit("/", 1)[1]
        return self._migrated

    def stop(self) -> None:
        try:
            if self.pid is not None:
                subprocess.run([*self._as, str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast",
                                "-w", "stop"], capture_output=True, timeout=60)
                deadline = time.monotonic() + 10
                while alive(self.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if alive(self.pid):
                    os.kill(self.pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

