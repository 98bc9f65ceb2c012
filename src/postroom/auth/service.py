"""Checking logins: argon2id verification, a verified-credential cache, and per-IP failure throttling.

Invariants:
- Unknown user and wrong password take the same path (a dummy hash is verified) and give the same answer.
- The cache holds only credentials that verified, keyed by a keyed hash (never the password itself),
  for ``cache_ttl`` seconds, like Dovecot's auth cache. It saves the argon2 work, not the account lookup:
  a hit counts only while the store still holds the same account with the same password hash, so a
  password change or deletion (also by another process, e.g. the CLI) takes effect at once.
- After a failure from an IP, each further attempt from that IP first waits a delay that doubles per
  failure (``throttle_base_delay`` … ``throttle_max_delay``); a success clears the IP's record.
- argon2 runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections import OrderedDict

from postroom.auth.limits import AuthConfig
from postroom.auth.passwords import DUMMY_HASH, verify_password
from postroom.store.api import Account, Store

log = logging.getLogger(__name__)


class Throttle:
    """Failure counts per remote IP with a growing delay (pure bookkeeping, no sleeping)."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._failures: dict[str, tuple[int, float]] = {}

    def delay(self, ip: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        entry = self._failures.get(ip)
        if entry is None:
            return 0.0
        count, last = entry
        if now - last > self.config.throttle_window:
            del self._failures[ip]
            return 0.0
        return float(min(self.config.throttle_base_delay * (2 ** (count - 1)), self.config.throttle_max_delay))

    def failed(self, ip: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        count, _ = self._failures.get(ip, (0, now))
        self._failures[ip] = (count + 1, now)
        if len(self._failures) > 100_000:  # bound memory under a distributed attack
            self._failures.pop(next(iter(self._failures)))

    def succeeded(self, ip: str) -> None:
        self._failures.pop(ip, None)


class Authenticator:
    """``authenticate(username, password, ip)`` → Account or None, with cache and throttling."""

    def __init__(self, store: Store, config: AuthConfig) -> None:
        self.store = store
        self.config = config
        self.throttle = Throttle(config)
        self._key = os.urandom(32)
        self._cache: OrderedDict[bytes, tuple[Account, float]] = OrderedDict()

    def _cache_key(self, address: str, password: str) -> bytes:
        return hmac.new(self._key, f"{address}\x00{password}".encode(), hashlib.sha256).digest()

    async def authenticate(self, username: str, password: str, ip: str) -> Account | None:
        delay = self.throttle.delay(ip)
        if delay > 0:
            await asyncio.sleep(delay)
        address = username.strip().lower()
        key = self._cache_key(address, password)
        now = time.monotonic()
        account = await self.store.get_account(address) if address else None
        hit = self._cache.get(key)
        if hit is not None:
            if hit[1] > now and account is not None and account == hit[0]:
                self._cache.move_to_end(key)
                self.throttle.succeeded(ip)
                return account
            del self._cache[key]
        stored = account.password_hash if account is not None else DUMMY_HASH
        ok = await asyncio.to_thread(verify_password, stored, password)
        if ok and account is not None:
            self.throttle.succeeded(ip)
            self._cache[key] = (account, now + self.config.cache_ttl)
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
            return account
        self.throttle.failed(ip)
        log.warning("authentication failed for %r from %s", address[:64], ip)
        return None
