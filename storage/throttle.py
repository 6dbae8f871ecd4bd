"""Throttling of guesses: failed sign-ins per account name and per address, bad API keys per address.

The state is rows (``auth_failures``), so it survives a restart and is shared by every server process on the
same database. A lock lasts until enough failures have left the window; every attempt refused while locked
counts as one more failure, so a guesser who keeps trying waits longer and longer (and the right password is
refused too while the lock lasts). Other names and addresses are never affected.

Knows nothing of HTTP: callers pass the name and the address and turn ``TooManyAttempts`` into a 429.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from storage.errors import TooManyAttempts
from storage.store import StoreBase

PASSWORD, API_KEY = "password", "api_key"


@dataclass
class ThrottleConfig:
    """How many failures lock what, for how long."""

    name_failures: int = 5
    """Wrong passwords for one account name within ``password_window_s`` that lock that name."""
    address_failures: int = 20
    """Wrong passwords from one address (any names) within ``password_window_s`` that lock that address."""
    password_window_s: float = 15 * 60
    """The window failed sign-ins are counted in."""
    key_failures: int = 20
    """Bad API keys from one address within ``key_window_s`` that lock that address out of the API."""
    key_window_s: float = 60
    """The window bad API keys are counted in."""

    def __post_init__(self):
        for name in ("name_failures", "address_failures", "key_failures"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 10**6:
                raise ValueError(f"{name}: must be an integer from 1 to 1000000, got {value!r}")
        for name in ("password_window_s", "key_window_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 1 <= value <= 7 * 86400:
                raise ValueError(f"{name}: must be a number of seconds from 1 to 604800, got {value!r}")


class Throttle:
    def __init__(self, store: StoreBase, config: ThrottleConfig | None = None, clock=time.time):
        self.store = store
        self.config = config or ThrottleConfig()
        self.clock = clock

    # sign-in ---------------------------------------------------------------------------------
    def check_password(self, name: str, address: str) -> None:
        """TooManyAttempts if sign-ins for ``name`` or from ``address`` are locked now (the attempt counts)."""
        c = self.config
        wait = max(self._wait(PASSWORD, "name", name.lower(), c.name_failures, c.password_window_s),
                   self._wait(PASSWORD, "address", address, c.address_failures, c.password_window_s))
        if wait > 0:
            self.failed_password(name, address)  # trying on while locked keeps it locked longer
            raise TooManyAttempts(wait)

    def failed_password(self, name: str, address: str) -> None:
        self._add(PASSWORD, name.lower(), address, self.config.password_window_s)

    def signed_in(self, name: str) -> None:
        """The right password (while not locked): the name's failures are forgotten (the address's stay)."""
        with self.store.write() as db:
            db.execute("DELETE FROM auth_failures WHERE kind = ? AND name = ?", [PASSWORD, name.lower()])

    # API keys --------------------------------------------------------------------------------
    def check_key(self, address: str) -> None:
        """TooManyAttempts if ``address`` sent too many bad API keys lately."""
        wait = self._wait(API_KEY, "address", address, self.config.key_failures, self.config.key_window_s)
        if wait > 0:
            raise TooManyAttempts(wait)

    def failed_key(self, address: str) -> None:
        self._add(API_KEY, "", address, self.config.key_window_s)

    # rows ------------------------------------------------------------------------------------
    def _add(self, kind: str, name: str, address: str, window: float) -> None:
        now = self.clock()
        with self.store.write() as db:
            db.execute("INSERT INTO auth_failures (kind, name, address, at) VALUES (?, ?, ?, ?)",
                       [kind, name, address, now])
            db.execute("DELETE FROM auth_failures WHERE kind = ? AND at < ?", [kind, now - window])

    def _wait(self, kind: str, column: str, value: str, limit: int, window: float) -> int:
        """Seconds until fewer than ``limit`` failures of ``value`` are left in the window (0: not locked)."""
        now = self.clock()
        times = [r[0] for r in self.store.db.execute(
            f"SELECT at FROM auth_failures WHERE kind = ? AND {column} = ? AND at >= ? ORDER BY at DESC",
            [kind, value, now - window])]
        if len(times) < limit:
            return 0
        return max(1, math.ceil(times[limit - 1] + window - now))
