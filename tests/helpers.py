"""Helpers for tests that start Attune as a user would: ``launch.py`` in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, data_dir: Path, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args, "--data-dir", str(data_dir)],
                          input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


class Server:
    """``python launch.py serve`` on a free loopback port; stopped on exit."""

    def __init__(self, data_dir: Path, *extra: str, timeout: float = 180):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(data_dir) / "server.log"
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), "serve", "--data-dir", str(data_dir), "--port", str(self.port),
             *extra], env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(self.base + "/healthz", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError("attune did not start:\n" + self.log_path.read_text()[-4000:])
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
