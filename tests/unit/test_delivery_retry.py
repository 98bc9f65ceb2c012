"""Retry schedule, smarthost URLs and presets, DKIM keys and signatures (verified with dkimpy)."""

from __future__ import annotations

from pathlib import Path

import dkim
import pytest

from postroom.delivery import smarthost
from postroom.delivery.dkimsign import DkimSigner, dns_records, from_domain, keygen
from postroom.delivery.limits import RETRY_SCHEDULE
from postroom.delivery.runner import retry_delay
from postroom.errors import ConfigError


def test_retry_delay_walks_the_schedule_then_repeats_the_last() -> None:
    sched = (10.0, 20.0, 40.0)
    assert [retry_delay(sched, n) for n in (1, 2, 3, 4, 9)] == [10.0, 20.0, 40.0, 40.0, 40.0]
    assert retry_delay(RETRY_SCHEDULE, 1) == 300.0 and retry_delay(RETRY_SCHEDULE, 3) == 1800.0
    assert sum(retry_delay(RETRY_SCHEDULE, n) for n in range(1, 40)) > 5 * 24 * 3600  # reaches max age


def test_smarthost_urls_and_presets(tmp_path: Path) -> None:
    assert smarthost.parse("") is None
    plain = smarthost.parse("smtp://relay.test")
    assert plain is not None and (plain.host, plain.port, plain.security, plain.verify) == (
        "relay.test",
        25,
        "plain",
        False,
    )
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    sub = smarthost.parse("smtp+starttls://me%40x.test@smtp.office365.com", str(pw))
    assert sub is not None and (sub.user, sub.password, sub.port, sub.security) == (
        "me@x.test",
        "s3cret",
        587,
        "starttls",
    )
    tls = smarthost.parse("smtps://u@relay.test:4650", env={smarthost.PASSWORD_ENV: "envpw"})
    assert tls is not None and (tls.port, tls.security, tls.password) == (4650, "tls", "envpw")
    g = smarthost.parse("gmail://me@gmail.com", env={smarthost.PASSWORD_ENV: "app-pw"})
    assert g is not None and (g.host, g.port, g.security, g.verify) == ("smtp.gmail.com", 587, "starttls", True)
    o = smarthost.parse("office365")
    assert o is not None and o.host == "smtp.office365.com" and o.concurrency == 3 and o.per_minute == 30
    with pytest.raises(ConfigError):
        smarthost.parse("smtp://u:inline@relay.test")  # never a password in the URL
    with pytest.raises(ConfigError):
        smarthost.parse("smtps://u@relay.test", env={})  # user but no password
    with pytest.raises(ConfigError):
        smarthost.parse("ftp://relay.test")


MSG = (
    b"From: Alice <alice@a.test>\r\nTo: bob@b.test\r\nSubject: signed\r\nDate: Thu, 26 Nov 2026 18:00:00 +0000\r\n"
    b"Message-ID: <1@a.test>\r\n\r\nHello Bob,\r\n  spaced   line  \r\n"
)


def test_dkim_keygen_sign_verify_both_algorithms(tmp_path: Path) -> None:
    records = keygen(tmp_path, "a.test", "sel")
    assert {name for name, _ in records} == {"sel-rsa._domainkey.a.test", "sel-ed25519._domainkey.a.test"}
    assert keygen(tmp_path, "a.test", "sel") == records  # idempotent: keys are kept
    assert dns_records(tmp_path, "a.test", "sel") == records
    for p in (tmp_path / "dkim" / "a.test").iterdir():
        assert p.stat().st_mode & 0o077 == 0
    txt = {name.encode() + b".": value.encode() for name, value in records}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return txt.get(name)

    signer = DkimSigner(tmp_path, "sel", {"a.test"}.__contains__)
    signed = signer.sign(MSG, "alice@a.test")
    assert signed.count(b"DKIM-Signature:") == 2
    assert b"a=ed25519-sha256" in signed and b"a=rsa-sha256" in signed and b"c=relaxed/relaxed" in signed
    # verify each signature (dkimpy checks the topmost one): strip one at a time
    first_end = signed.index(b"DKIM-Signature:", 10)
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert dkim.verify(signed[first_end:], dnsfunc=dnsfunc)
    # relaxed body canonicalization survives whitespace changes, a changed body does not
    assert dkim.verify(signed.replace(b"  spaced   line  ", b"  spaced line"), dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"Hello Bob", b"Hello Eve"), dnsfunc=dnsfunc)


def test_dkim_only_for_local_domains(tmp_path: Path) -> None:
    keygen(tmp_path, "a.test", "sel")
    signer = DkimSigner(tmp_path, "sel", {"a.test", "nokeys.test"}.__contains__)
    other = MSG.replace(b"alice@a.test", b"x@elsewhere.test")
    assert signer.sign(other, "x@elsewhere.test") == other
    assert signer.sign(other, "x@a.test").startswith(b"DKIM-Signature:")  # envelope sender's domain
    nokeys = MSG.replace(b"alice@a.test", b"x@nokeys.test")
    assert signer.sign(nokeys, "x@nokeys.test") == nokeys
    assert from_domain(b"From: =?utf-8?q?A?=\r\n <A@A.Test>\r\n\r\n") == "a.test"


def test_smarthost_rate_limit_token_bucket() -> None:
    rl = smarthost.RateLimit(30, now=1000.0)  # 30 a minute: one every 2 s after a burst of 30
    waits = [rl.reserve(1000.0) for _ in range(32)]
    assert waits[:30] == [0.0] * 30
    assert waits[30] == pytest.approx(2.0) and waits[31] == pytest.approx(4.0)
    # a minute later the bucket has refilled the two borrowed tokens and 28 more
    assert rl.reserve(1060.0) == 0.0
    later = [rl.reserve(1060.0) for _ in range(30)]
    assert sum(1 for w in later if w == 0.0) == 27 and max(later) > 0


def test_return_path_is_not_relayed() -> None:
    """RFC 5321 §4.4: the stored copy's Return-Path (also folded) never leaves with the relayed message."""
    from postroom.delivery.runner import strip_return_path

    body = b"From: a@example.test\r\nSubject: x\r\n\r\nReturn-Path: <in body>\r\n"
    assert strip_return_path(b"Return-Path: <a@example.test>\r\n" + body) == body
    assert strip_return_path(b"return-path:\r\n <a@example.test>\r\n\t(folded)\r\n" + body) == body
    assert strip_return_path(body) == body
    assert strip_return_path(b"Return-Path: <a@x>") == b"Return-Path: <a@x>"  # no header end: untouched
