"""SASL PLAIN/LOGIN exchanges (no I/O), failure throttling, and the Authenticator's answers and cache."""

from __future__ import annotations

import asyncio
import base64
from typing import cast

import pytest

from postroom.auth.limits import AuthConfig
from postroom.auth.passwords import DUMMY_HASH, hash_password, verify_password
from postroom.auth.sasl import Challenge, Credentials, SaslCancelled, SaslError, SaslExchange
from postroom.auth.service import Authenticator, Throttle
from postroom.errors import RemoteProtocolError
from postroom.store.api import Account, Store


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# -- SASL PLAIN (RFC 4616) ------------------------------------------------------------------------------
def test_plain_with_initial_response() -> None:
    got = SaslExchange("PLAIN").start(b64(b"\x00bob@example.test\x00s3cret"))
    assert got == Credentials("", "bob@example.test", "s3cret")


def test_plain_without_initial_response_and_with_authzid() -> None:
    ex = SaslExchange("plain")  # mechanism names are case-insensitive
    assert ex.start(None) == Challenge(b"")
    got = ex.respond(b64(b"admin\x00bob\x00pw with spaces \xc3\xa9") + b"\r\n")
    assert got == Credentials("admin", "bob", "pw with spaces é")


@pytest.mark.parametrize(
    "line",
    [
        b"not base64!",
        b"Ym9i",  # "bob": no NULs
        b64(b"\x00\x00password"),  # empty authcid
        b64(b"a\x00b\x00c\x00d"),  # too many parts
        b64(b"\x00bob\x00\xff\xfe"),  # not UTF-8
        b"=",  # empty response
        b"A" * (12 * 1024 + 4),  # over MAX_RESPONSE
    ],
)
def test_plain_malformed(line: bytes) -> None:
    with pytest.raises(SaslError):
        SaslExchange("PLAIN").start(line)
    ex = SaslExchange("PLAIN")
    ex.start(None)
    with pytest.raises(SaslError):
        ex.respond(line)


def test_star_cancels() -> None:
    ex = SaslExchange("PLAIN")
    ex.start(None)
    with pytest.raises(SaslCancelled):
        ex.respond(b"*\r\n")
    login = SaslExchange("LOGIN")
    login.start(None)
    login.respond(b64(b"bob"))
    with pytest.raises(SaslCancelled):
        login.respond(b"*")
    # Both are the peer's doing: adapters catch RemoteProtocolError in one place.
    assert issubclass(SaslCancelled, RemoteProtocolError) and issubclass(SaslError, RemoteProtocolError)


def test_unsupported_mechanism() -> None:
    with pytest.raises(SaslError):
        SaslExchange("CRAM-MD5")


# -- SASL LOGIN -----------------------------------------------------------------------------------------
def test_login_exchange() -> None:
    ex = SaslExchange("LOGIN")
    first = ex.start(None)
    assert first == Challenge(b64(b"Username:"))
    second = ex.respond(b64(b"bob@example.test"))
    assert second == Challenge(b64(b"Password:"))
    assert ex.respond(b64(b"pw")) == Credentials("", "bob@example.test", "pw")
    with pytest.raises(SaslError):  # nothing more is expected
        ex.respond(b64(b"extra"))


def test_login_with_initial_response() -> None:
    ex = SaslExchange("LOGIN")
    assert ex.start(b64(b"bob")) == Challenge(b64(b"Password:"))
    assert ex.respond(b64(b"")) == Credentials("", "bob", "")


def test_login_malformed_base64() -> None:
    ex = SaslExchange("LOGIN")
    ex.start(None)
    with pytest.raises(SaslError):
        ex.respond(b"@@@")


# -- throttling -----------------------------------------------------------------------------------------
def test_throttle_delay_doubles_caps_and_expires() -> None:
    t = Throttle(AuthConfig(throttle_base_delay=0.5, throttle_max_delay=3.0, throttle_window=100.0))
    assert t.delay("192.0.2.1", now=0.0) == 0.0
    seen = []
    for i in range(5):
        t.failed("192.0.2.1", now=float(i))
        seen.append(t.delay("192.0.2.1", now=float(i)))
    assert seen == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert t.delay("192.0.2.2", now=5.0) == 0.0  # per IP
    assert t.delay("192.0.2.1", now=4.0 + 101.0) == 0.0  # forgotten after the window
    t.failed("192.0.2.3", now=0.0)
    t.succeeded("192.0.2.3")
    assert t.delay("192.0.2.3", now=0.0) == 0.0


# -- the Authenticator ---------------------------------------------------------------------------------
class FakeAccounts:
    """Just enough of the Store for the Authenticator: accounts by address."""

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.lookups = 0

    async def get_account(self, address: str) -> Account | None:
        self.lookups += 1
        return self.accounts.get(address)


@pytest.fixture(scope="module")
def bob_hash() -> str:
    return hash_password("right")


@pytest.fixture
def accounts(bob_hash: str) -> FakeAccounts:
    fake = FakeAccounts()
    fake.accounts["bob@example.test"] = Account(1, "bob@example.test", bob_hash)
    return fake


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The throttle's sleeps, recorded instead of slept."""
    seen: list[float] = []

    async def fake_sleep(delay: float) -> None:
        seen.append(delay)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return seen


@pytest.fixture
def verified(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The stored hashes the Authenticator verified against."""
    seen: list[str] = []

    def spy(stored: str, password: str) -> bool:
        seen.append(stored)
        return verify_password(stored, password)

    monkeypatch.setattr("postroom.auth.service.verify_password", spy)
    return seen


def make_auth(accounts: FakeAccounts, **cfg: float) -> Authenticator:
    return Authenticator(cast(Store, accounts), AuthConfig(**cfg))  # type: ignore[arg-type]


async def test_success_and_case_insensitive_login(accounts: FakeAccounts, sleeps: list[float]) -> None:
    auth = make_auth(accounts)
    acct = await auth.authenticate(" Bob@Example.TEST ", "right", "192.0.2.1")
    assert acct is not None and acct.address == "bob@example.test"
    assert sleeps == []


async def test_unknown_user_and_bad_password_look_the_same(
    accounts: FakeAccounts, sleeps: list[float], verified: list[str], bob_hash: str
) -> None:
    auth = make_auth(accounts, throttle_base_delay=0.25, throttle_max_delay=10.0)
    wrong = await auth.authenticate("bob@example.test", "wrong", "192.0.2.10")
    unknown = await auth.authenticate("nobody@example.test", "wrong", "192.0.2.11")
    assert wrong is None and unknown is None
    # Both paths did one argon2 verification: the real hash, and the dummy for the unknown user …
    assert verified == [bob_hash, DUMMY_HASH]
    # … and both leave the same throttle state behind.
    assert auth.throttle.delay("192.0.2.10") == auth.throttle.delay("192.0.2.11") == 0.25
    assert sleeps == []


async def test_delays_grow_per_ip_and_success_clears(accounts: FakeAccounts, sleeps: list[float]) -> None:
    auth = make_auth(accounts, throttle_base_delay=0.5, throttle_max_delay=2.0)
    ip = "198.51.100.7"
    for _ in range(4):
        assert await auth.authenticate("bob@example.test", "wrong", ip) is None
    assert sleeps == [0.5, 1.0, 2.0]  # the first attempt waits nothing; then doubling, capped
    await auth.authenticate("bob@example.test", "wrong", "198.51.100.8")  # another IP: no wait
    assert sleeps == [0.5, 1.0, 2.0]
    assert await auth.authenticate("bob@example.test", "right", ip) is not None
    assert sleeps[-1] == 2.0  # a correct password still waits its turn
    await auth.authenticate("bob@example.test", "right", ip)
    assert len(sleeps) == 4  # … and success cleared the record


async def test_cache_hit(accounts: FakeAccounts, sleeps: list[float], verified: list[str]) -> None:
    auth = make_auth(accounts)
    assert await auth.authenticate("bob@example.test", "right", "192.0.2.1") is not None
    assert len(verified) == 1
    assert await auth.authenticate("bob@example.test", "right", "192.0.2.1") is not None
    assert len(verified) == 1  # no argon2 run on a hit
    # … a wrong password is never a cache hit …
    assert await auth.authenticate("bob@example.test", "nope", "192.0.2.2") is None
    assert len(verified) == 2


async def test_password_change_or_deletion_beats_the_cache(accounts: FakeAccounts, verified: list[str]) -> None:
    """A change made elsewhere (the CLI is another process) takes effect at once, cache or not."""
    auth = make_auth(accounts)
    assert await auth.authenticate("bob@example.test", "right", "192.0.2.1") is not None
    accounts.accounts["bob@example.test"] = Account(1, "bob@example.test", hash_password("changed"))
    assert await auth.authenticate("bob@example.test", "right", "192.0.2.1") is None
    assert await auth.authenticate("bob@example.test", "changed", "192.0.2.1") is not None
    del accounts.accounts["bob@example.test"]
    assert await auth.authenticate("bob@example.test", "changed", "192.0.2.1") is None


async def test_cache_ttl_zero_disables_cache(accounts: FakeAccounts, verified: list[str]) -> None:
    auth = make_auth(accounts, cache_ttl=0.0)
    for _ in range(2):
        assert await auth.authenticate("bob@example.test", "right", "192.0.2.1") is not None
    assert len(verified) == 2


async def test_empty_username_fails_like_any_other(accounts: FakeAccounts, verified: list[str]) -> None:
    auth = make_auth(accounts)
    assert await auth.authenticate("", "right", "192.0.2.1") is None
    assert verified == [DUMMY_HASH]
    assert accounts.lookups == 0
