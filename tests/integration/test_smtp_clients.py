"""The SMTP server with real clients: smtplib (plain, STARTTLS, SMTP_SSL, AUTH) and aiosmtplib.

Servers run inside the test on 127.0.0.1:0 (the shared ``server_factory`` fixture); what was delivered is
checked through the store API.
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest

from conftest import RunningServer
from postroom.errors import StoreFullError

ALICE, ALICE_PW = "alice@example.test", "alice-pass-1"
BOB, BOB_PW = "bob@example.test", "bob-pass-2"
SERVICES = ["smtp", "submission", "submissions"]
Factory = Callable[..., RunningServer]


@pytest.fixture
def srv(server_factory: Factory) -> RunningServer:
    s = server_factory(services=SERVICES)
    s.add_user(ALICE, ALICE_PW)
    s.add_user(BOB, BOB_PW)
    return s


def header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def test_mx_delivers_without_auth_with_trace_headers(srv: RunningServer) -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"], local_hostname="client.remote.test") as s:
        code, caps = s.ehlo()
        assert code == 250 and b"PIPELINING" in caps and b"STARTTLS" in caps and b"AUTH" not in caps
        refused = s.sendmail("sender@remote.test", [ALICE], b"Subject: hello\r\n\r\nHi Alice.\r\n")
        assert refused == {}
    [raw] = srv.inbox(ALICE)
    lines = raw.split(b"\r\n")
    assert lines[0] == b"Return-Path: <sender@remote.test>"
    assert lines[1] == b"Received: from client.remote.test ([127.0.0.1])"
    assert b"by mx.example.test (Postroom) with ESMTP id " in raw
    assert b"for <alice@example.test>;" in raw
    assert raw.endswith(b"Subject: hello\r\n\r\nHi Alice.\r\n")


def test_mx_refuses_relay_and_unknown_users(srv: RunningServer) -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"]) as s:
        s.ehlo()
        s.mail("sender@remote.test")
        assert s.rcpt("someone@elsewhere.test")[:1] == (554,)
        code, msg = s.rcpt("nobody@example.test")
        assert code == 550 and msg.startswith(b"5.1.1")
        code, msg = s.rcpt("someone@elsewhere.test")
        assert msg.startswith(b"5.7.1")
    assert srv.call(srv.store.queue_list()) == []


def test_submission_starttls_login_8bit_and_utf8(srv: RunningServer) -> None:
    with smtplib.SMTP(srv.host, srv.ports["submission"]) as s:
        s.ehlo()
        assert not s.has_extn("auth")  # AUTH is only offered after STARTTLS
        s.starttls(context=srv.client_tls())
        s.ehlo()
        assert s.has_extn("auth") and not s.has_extn("starttls")
        s.login(ALICE, ALICE_PW)
        msg = EmailMessage()
        msg["From"] = ALICE
        msg["To"] = BOB
        msg["Subject"] = "Grüße"
        msg.set_content("Schöne Grüße aus Köln\n", cte="8bit")
        s.send_message(msg)
        # SMTPUTF8: a UTF-8 sender display name and 8-bit body; the envelope keeps ASCII here.
        utf8 = EmailMessage()
        utf8["From"] = "Jörg <alice@example.test>"
        utf8["To"] = "bob@example.test"
        utf8["Subject"] = "ñ"
        utf8.set_content("ü\n")
        s.send_message(utf8, mail_options=["SMTPUTF8"])
    raws = srv.inbox(BOB)
    assert len(raws) == 2
    assert "Schöne Grüße aus Köln".encode() in raws[0]
    assert b"with ESMTPSA id" in raws[0] and b"(using TLSv1." in raws[0]
    assert b"with UTF8SMTPSA id" in raws[1]


def test_utf8_recipient_address(srv: RunningServer) -> None:
    srv.add_user("jörg@example.test", "joerg-pass")
    with smtplib.SMTP_SSL(srv.host, srv.ports["submissions"], context=srv.client_tls()) as s:
        s.login(ALICE, ALICE_PW)
        msg = EmailMessage()
        msg["From"] = ALICE
        msg["To"] = "jörg@example.test"
        msg["Subject"] = "hallo"
        msg.set_content("für dich\n")
        s.send_message(msg)  # smtplib adds SMTPUTF8 itself for the non-ASCII address
    [raw] = srv.inbox("jörg@example.test")
    assert "für dich".encode() in raw and b"UTF8SMTPSA" in raw


def test_implicit_tls_465(srv: RunningServer) -> None:
    with smtplib.SMTP_SSL(srv.host, srv.ports["submissions"], context=srv.client_tls()) as s:
        s.ehlo()
        assert s.has_extn("auth") and not s.has_extn("starttls")
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, [ALICE, BOB], b"Subject: both\r\n\r\nto two\r\n")
    [a] = srv.inbox(ALICE)
    [b] = srv.inbox(BOB)
    assert a == b and b"(using TLSv1." in a

    # One stored copy is shared by every local recipient of a transaction.
    async def blobs() -> set[int]:
        out = set()
        for addr in (ALICE, BOB):
            acct = await srv.store.get_account(addr)
            assert acct is not None
            mb = await srv.store.get_mailbox(acct.id, "INBOX")
            assert mb is not None
            out |= {m.blob_id for m in await srv.store.messages(mb.id)}
        return out

    assert len(srv.call(blobs())) == 1


def test_submission_rules(srv: RunningServer) -> None:
    with smtplib.SMTP(srv.host, srv.ports["submission"]) as s:
        s.starttls(context=srv.client_tls())
        s.ehlo()
        code, _ = s.mail(ALICE)
        assert code == 530  # no AUTH yet
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            s.login(ALICE, "wrong")
        assert exc.value.smtp_code == 535
        s.login(ALICE, ALICE_PW)
        code, msg = s.mail(BOB)  # not alice's address
        assert code == 553 and msg.startswith(b"5.7.1")
        code, _ = s.mail("<>")
        assert code == 553


def test_alias_sender_and_recipient(srv: RunningServer) -> None:
    srv.call(srv.store.add_alias("info@example.test", ALICE))
    with smtplib.SMTP_SSL(srv.host, srv.ports["submissions"], context=srv.client_tls()) as s:
        s.login(ALICE, ALICE_PW)
        s.sendmail("info@example.test", ["info@example.test"], b"Subject: alias\r\n\r\nx\r\n")
    [raw] = srv.inbox(ALICE)
    assert raw.startswith(b"Return-Path: <info@example.test>\r\n")


def test_remote_recipients_are_queued_with_dsn(srv: RunningServer) -> None:
    with smtplib.SMTP_SSL(srv.host, srv.ports["submissions"], context=srv.client_tls()) as s:
        s.login(ALICE, ALICE_PW)
        s.ehlo()
        s.sendmail(
            ALICE,
            ["carol@remote.test", BOB],
            b"Subject: out\r\n\r\nfar away\r\n",
            mail_options=["RET=HDRS", "ENVID=job+2B1"],
            rcpt_options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;carol@remote.test"],
        )
    queue = srv.call(srv.store.queue_list())
    assert [(q.recipient, q.sender) for q in queue] == [("carol@remote.test", ALICE)]
    q = queue[0]
    assert (q.ret, q.envid, q.notify, q.orcpt) == ("HDRS", "job+1", "FAILURE,DELAY", "rfc822;carol@remote.test")
    body = srv.call(srv.store.read_queued(q.message_id))
    assert body.endswith(b"far away\r\n") and b"Received: from" in body
    [local] = srv.inbox(BOB)
    assert local.endswith(b"far away\r\n")


def _fail_append(srv: RunningServer, exc: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(srv.app.store, "append", broken)


@pytest.mark.parametrize(
    ("exc", "code", "enhanced"), [(OSError("disk"), 451, b"4.3.0"), (StoreFullError("full"), 452, b"4.3.1")]
)
def test_store_failure_is_never_250(
    server_factory: Factory, monkeypatch: pytest.MonkeyPatch, exc: Exception, code: int, enhanced: bytes
) -> None:
    srv = server_factory(services=["smtp"])
    srv.add_user(ALICE, ALICE_PW)
    _fail_append(srv, exc, monkeypatch)
    with smtplib.SMTP(srv.host, srv.ports["smtp"]) as s:
        s.ehlo()
        s.mail("x@remote.test")
        s.rcpt(ALICE)
        got, msg = s.data(b"Subject: x\r\n\r\ny\r\n")
        assert got == code and msg.startswith(enhanced)
        assert s.noop()[0] == 250  # the session goes on


def test_bdat_over_the_wire(srv: RunningServer) -> None:
    with socket.create_connection((srv.host, srv.ports["smtp"]), timeout=10) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220")
        body1, body2 = b"Subject: chunked\r\n\r\n", b"in two chunks\r\n"
        sock.sendall(
            b"EHLO c\r\nMAIL FROM:<s@remote.test> BODY=8BITMIME\r\nRCPT TO:<alice@example.test>\r\n"
            + b"BDAT %d\r\n" % len(body1)
            + body1
            + b"BDAT %d LAST\r\n" % len(body2)
            + body2
            + b"QUIT\r\n"
        )
        replies = [line for line in f.read().split(b"\r\n") if line[3:4] == b" "]
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"250", b"250", b"221"]
    [raw] = srv.inbox(ALICE)
    assert raw.endswith(body1 + body2)


async def test_aiosmtplib_starttls_and_login(srv: RunningServer) -> None:
    msg = EmailMessage()
    msg["From"] = ALICE
    msg["To"] = BOB
    msg["Subject"] = "from aiosmtplib"
    msg.set_content("async hello\n")
    errors, _ = await aiosmtplib.send(
        msg,
        hostname=srv.host,
        port=srv.ports["submission"],
        start_tls=True,
        tls_context=srv.client_tls(),
        username=ALICE,
        password=ALICE_PW,
    )
    assert errors == {}
    errors, _ = await aiosmtplib.send(
        msg,
        hostname=srv.host,
        port=srv.ports["submissions"],
        use_tls=True,
        tls_context=srv.client_tls(),
        username=ALICE,
        password=ALICE_PW,
    )
    assert errors == {}
    raws = srv.inbox(BOB)
    assert len(raws) == 2 and all(b"async hello" in r for r in raws)


async def test_aiosmtplib_many_messages_one_session(srv: RunningServer) -> None:
    async with aiosmtplib.SMTP(hostname=srv.host, port=srv.ports["smtp"], start_tls=False) as client:
        for i in range(20):
            await client.sendmail("s@remote.test", [ALICE], b"Subject: n%d\r\n\r\nbody\r\n" % i)
    assert len(srv.inbox(ALICE)) == 20


def test_graceful_shutdown_says_421_to_waiting_sessions(srv: RunningServer) -> None:
    from postroom.net.server import shutdown

    idle = socket.create_connection((srv.host, srv.ports["smtp"]), timeout=10)
    f = idle.makefile("rb")
    assert f.readline().startswith(b"220")
    idle.sendall(b"EHLO c\r\n")
    while f.readline()[3:4] == b"-":
        pass
    cancelled = srv.call(shutdown(srv.listeners, grace=10.0))
    assert f.readline().startswith(b"421 4.3.2")
    assert f.readline() == b""
    assert cancelled == 0  # nobody had to be cancelled: the idle session left by itself
    idle.close()


def test_submission_adds_a_missing_date_and_message_id_mx_does_not(srv: RunningServer) -> None:
    """RFC 6409 §8.2-8.3: the MSA adds ``Date:`` and ``Message-ID:`` to a submitted message that lacks them
    (scripts and devices often send none, and providers refuse mail without a Message-ID), keeps the ones
    it has, and an MX stores what it received as it was."""
    bare = b"From: alice@example.test\r\nSubject: bare\r\n\r\nno date, no id\r\n"
    full = b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\nmessage-id: <own@x.test>\r\nSubject: full\r\n\r\nhas both\r\n"
    with smtplib.SMTP_SSL(srv.host, srv.ports["submissions"], context=srv.client_tls()) as s:
        s.login(ALICE, ALICE_PW)
        assert s.sendmail(ALICE, [ALICE], bare) == {}
        assert s.sendmail(ALICE, [ALICE], full) == {}
    with smtplib.SMTP(srv.host, srv.ports["smtp"]) as s:
        assert s.sendmail("sender@remote.test", [ALICE], bare) == {}
    submitted, kept, relayed = srv.inbox(ALICE)
    header, _, body = submitted.partition(b"\r\n\r\n")
    assert body == b"no date, no id\r\n"
    lines = header.split(b"\r\n")
    assert lines[-4:-2] == [b"From: alice@example.test", b"Subject: bare"]  # added after the sender's fields
    assert lines[-2].startswith(b"Date: ") and lines[-2].endswith(b" +0000")
    assert lines[-1].startswith(b"Message-ID: <") and lines[-1].endswith(b"@mx.example.test>")
    assert kept.endswith(full) and kept.lower().count(b"message-id:") == 1 and kept.count(b"\r\nDate:") == 1
    assert relayed.endswith(b"\r\n" + bare) and b"Message-ID" not in relayed


def test_the_standard_librarys_event_loop_serves_sessions_and_tls(server_factory: Factory) -> None:
    """``[net] event_loop = "asyncio"``: the session is not an ``asyncio.Protocol`` subclass (so that mypyc
    compiles it) and must still work under the standard loop, whose TLS layer wraps it (STARTTLS, 465)."""
    s_ = server_factory(services=SERVICES, net={"event_loop": "asyncio"})
    s_.add_user(ALICE, ALICE_PW)
    with smtplib.SMTP(s_.host, s_.ports["submission"]) as s:
        s.starttls(context=s_.client_tls())
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, [ALICE], b"Subject: starttls\r\n\r\none\r\n")
    with smtplib.SMTP_SSL(s_.host, s_.ports["submissions"], context=s_.client_tls()) as s:
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, [ALICE], b"Subject: implicit\r\n\r\ntwo\r\n")
    with smtplib.SMTP(s_.host, s_.ports["smtp"]) as s:
        s.sendmail("sender@remote.test", [ALICE], b"Subject: mx\r\n\r\nthree\r\n")
    raws = s_.inbox(ALICE)
    assert [r.split(b"Subject: ")[1].split(b"\r\n")[0] for r in raws] == [b"starttls", b"implicit", b"mx"]
    assert all(b"(using TLSv1." in r for r in raws[:2])
