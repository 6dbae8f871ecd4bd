"""Helpers for tests that start Attune as a user would: ``launch.py`` in a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
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


def alive(pid: int) -> bool:
    """Whether the process runs (exists and is not a zombie waiting for its parent)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def stop_all(procs, wait: float = 15) -> None:
    """Ask every process still running to stop (SIGTERM), then wait for each; one that does not end within
    ``wait`` seconds is killed (SIGKILL)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def open_page(browser, server, locale="en-US", **context):
    """A fresh browser context on Attune's sign-in page; ``page.requests`` records every URL fetched.
    ``context`` goes to ``browser.new_context`` (e.g. ``viewport`` for a phone)."""
    ctx = browser.new_context(locale=locale, **context)
    page = ctx.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(server.base + "/")
    page.get_by_label("User name" if locale == "en-US" else "用户名").wait_for(timeout=30_000)
    return page


def db_rows(server, sql, args=()):
    con = sqlite3.connect(server.data / "attune.db")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args)]
    finally:
        con.close()


def sign_up(page, name, password):
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Create account").click()
    page.locator("#who").get_by_text(name).wait_for(timeout=15_000)


def sign_in(page, name, password):
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.locator("#who").get_by_text(name).wait_for(timeout=15_000)


# driving the chat tab -----------------------------------------------------------------------
def bot(page):
    return page.locator("#chatbot").get_by_test_id("bot")


def send(page, text):
    page.locator("#msg textarea").fill(text)
    page.locator("#msg textarea").press("Enter")


def n_answers(server, user=None):
    sql, args = "SELECT * FROM messages WHERE role = 'assistant'", []
    if user:
        sql += " AND user_id = (SELECT id FROM users WHERE name = ?)"
        args = [user]
    return len(db_rows(server, sql, args))


def ask(page, server, text, user=None):
    """Send ``text`` and wait until its answer is stored and the composer is back to Send."""
    from playwright.sync_api import expect

    before = n_answers(server, user)
    send(page, text)
    wait_for(lambda: n_answers(server, user) > before, what=f"an answer to {text!r}")
    expect(page.locator("#send-btn")).to_be_visible(timeout=30_000)


def long_answers(page, tokens=600):
    """Set the answer limit (Generation settings): high so an answer streams for a while, low to cut it."""
    from playwright.sync_api import expect

    box = page.locator("#max-new input[type=number]")
    if not box.is_visible():
        page.locator("#settings").get_by_text("Generation settings").click()
    # Typed right as the accordion opens, a value can be overwritten by the slider's own mount (the box shows it,
    # the page still sends the old limit): leaving the box commits it (Gradio puts its state back in the box on
    # blur), so type again until the box keeps it.
    for _ in range(5):
        box.fill(str(tokens))
        box.press("Tab")
        page.wait_for_timeout(300)
        if box.input_value() == str(tokens):
            return
    expect(box).to_have_value(str(tokens))


def pick_memory(page, text):
    """Click the Memory tab's row showing ``text``: it opens with Save edit and Delete."""
    from playwright.sync_api import expect

    page.locator("#memory-table .cell-wrap:visible").filter(has_text=text).first.click()
    expect(page.locator("#memory-selected").first).to_be_visible(timeout=10_000)
    expect(page.locator("#memory-edit-text textarea")).to_have_value(re.compile(re.escape(text)))


def remember_in_tab(page, fact: str) -> None:
    """Type a fact in the Memory tab, press Remember and wait for the confirmation, as a user would."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Memory").click()
    page.locator("#memory-fact textarea, #memory-fact input").fill(fact)
    page.get_by_role("button", name="Remember", exact=True).click()
    expect(page.locator("#memory-status")).to_contain_text("Remembered", timeout=30_000)


def create_key_in_tab(page, name: str) -> str:
    """Create a named API key in the Account tab (already open); the key shown once, after it is listed."""
    import re

    from playwright.sync_api import expect

    page.locator("#key-name input, #key-name textarea").fill(name)
    page.get_by_role("button", name="Create API key").click()
    key_box = page.locator("#api-key textarea, #api-key input")
    expect(key_box).to_have_value(re.compile(r"^att-"), timeout=10_000)
    expect(page.locator("#keys")).to_contain_text(name)
    return key_box.input_value()
