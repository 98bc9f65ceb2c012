"""The SMTP server core as transcripts: no sockets, no event loop."""

from __future__ import annotations

import pytest
from test_smtp_driver import Driver, limits, plain

from postroom.errors import LocalProtocolError
from postroom.smtp.events import Close, Message, NeedData
from postroom.smtp.server import SmtpServer, received_fields
from postroom.wire import replies

MAIL = b"EHLO client.test\r\nMAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@local.test>\r\n"


def test_ehlo_lists_extensions() -> None:
    d = Driver(starttls=True)
    out = d.send(b"EHLO client.test\r\n").decode()
    for ext in ("PIPELINING", "SIZE 52428800", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"):
        assert f"250-{ext}\r\n" in out or f"250 {ext}\r\n" in out
    assert "STARTTLS" in out and "AUTH" not in out  # MX: no AUTH


def test_whole_transaction_pipelined_in_one_chunk() -> None:
    d = Driver()
    d.send(b"EHLO c\r\n")
    codes = d.codes(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@local.test>\r\nRCPT TO:<Bob@Local.Test>\r\nDATA\r\n")
    assert codes == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354"]
    assert d.codes(b"Subject: x\r\n\r\n..hi\r\n.\r\nQUIT\r\n") == ["250 2.0.0", "221 2.0.0"]
    assert d.closed
    (msg,) = d.messages
    assert msg.data == b"Subject: x\r\n\r\n.hi\r\n"
    env = msg.envelope
    assert env.mail.sender is not None and str(env.mail.sender) == "s@remote.test"
    assert [r.token for r in env.recipients] == ["alice@local.test", "Bob@local.test"]
    assert env.helo == "c" and env.protocol == "ESMTP"


def test_byte_by_byte_gives_same_transcript() -> None:
    script = MAIL + b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n"
    whole = Driver()
    out_whole = whole.send(script)
    slow = Driver()
    out_slow = b"".join(slow.send(script[i : i + 1]) for i in range(len(script)))
    assert out_slow == out_whole
    assert [m.data for m in slow.messages] == [m.data for m in whole.messages] == [b"Subject: x\r\n\r\nbody\r\n"]


def test_sequence_errors() -> None:
    d = Driver()
    assert d.codes(b"MAIL FROM:<a@b.test>\r\n") == ["503 5.5.1"]  # before EHLO
    d.send(b"HELO c\r\n")
    assert d.codes(b"RCPT TO:<alice@local.test>\r\n") == ["503 5.5.1"]
    assert d.codes(b"DATA\r\n") == ["503 5.5.1"]
    d.send(b"MAIL FROM:<a@b.test>\r\n")
    assert d.codes(b"MAIL FROM:<a@b.test>\r\n") == ["503 5.5.1"]
    assert d.codes(b"DATA\r\n") == ["554 5.5.1"]  # no valid recipients


def test_unknown_user_and_relay_refused() -> None:
    d = Driver()
    d.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    assert d.codes(b"RCPT TO:<nobody@local.test>\r\n") == ["550 5.1.1"]
    assert d.codes(b"RCPT TO:<someone@elsewhere.test>\r\n") == ["554 5.7.1"]


def test_postmaster_without_domain() -> None:
    d = Driver()
    d.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    assert d.codes(b"RCPT TO:<Postmaster>\r\n") == ["250 2.1.5"]


def test_mail_parameters_and_dsn() -> None:
    d = Driver()
    d.send(b"EHLO c\r\n")
    d.send(b"MAIL FROM:<a@b.test> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=QQ+2Bx AUTH=<>\r\n")
    mail = d.events[-1]
    assert mail.size == 1000 and mail.body == "8BITMIME" and mail.ret == "HDRS"  # type: ignore[union-attr]
    assert mail.envid == "QQ+x"  # type: ignore[union-attr]
    d.send(b"RCPT TO:<alice@local.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice+40local.test\r\n")
    rcpt = d.events[-1]
    assert rcpt.notify == "SUCCESS,FAILURE" and rcpt.orcpt == "rfc822;alice@local.test"  # type: ignore[union-attr]
    assert d.codes(b"RCPT TO:<bob@local.test> FOO=bar\r\n") == ["555 5.5.4"]
    assert d.codes(b"RCPT TO:<bob@local.test> NOTIFY=NEVER,SUCCESS\r\n") == ["501 5.5.4"]


def test_size_declared_too_big() -> None:
    d = Driver(limits=limits(max_message_size=100))
    d.send(b"EHLO c\r\n")
    assert d.codes(b"MAIL FROM:<a@b.test> SIZE=101\r\n") == ["552 5.3.4"]
    assert d.codes(b"MAIL FROM:<a@b.test> SIZE=100\r\n") == ["250 2.1.0"]


def test_oversize_data_gives_552_and_session_stays_usable() -> None:
    d = Driver(limits=limits(max_message_size=100))
    d.send(MAIL + b"DATA\r\n")
    assert d.codes(b"x" * 50 + b"\r\n" + b"y" * 60 + b"\r\n.\r\n") == ["552 5.3.4"]
    assert d.codes(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\n") == ["250 2.1.0", "250 2.1.5", "354"]
    assert d.codes(b"small\r\n.\r\n") == ["250 2.0.0"]
    assert [m.data for m in d.messages] == [b"small\r\n"]


def test_recipient_limit() -> None:
    d = Driver(limits=limits(max_recipients=3))
    d.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    codes = d.codes(b"RCPT TO:<alice@local.test>\r\n" * 4)
    assert codes == ["250 2.1.5"] * 3 + ["452 4.5.3"]


def test_too_many_received_fields_is_a_mail_loop() -> None:
    """RFC 5321 §6.3: a message that already carries ``max_received`` Received: fields is refused with
    554 5.4.6, in DATA and BDAT alike; the session goes on. Received: lines in the body, and the
    continuation lines of folded fields, do not count; the name matches in any case."""
    d = Driver(limits=limits(max_received=3))
    two = b"Received: from a\r\n\tby b\r\nRECEIVED: from c\r\nSubject: x\r\n\r\n"
    d.send(MAIL + b"DATA\r\n")
    assert d.codes(two + b"Received: in the body\r\nReceived: too\r\n.\r\n") == ["250 2.0.0"]
    d.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@local.test>\r\nDATA\r\n")
    assert d.codes(b"received: from z\r\n" + two + b"body\r\n.\r\n") == ["554 5.4.6"]
    d.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@local.test>\r\n")
    three = b"received: from z\r\n" + two + b"body\r\n"
    assert d.codes(b"BDAT %d LAST\r\n" % len(three) + three) == ["554 5.4.6"]
    assert d.codes(b"MAIL FROM:<s@remote.test>\r\n") == ["250 2.1.0"]  # the transaction was reset
    assert len(d.messages) == 1
    unlimited = Driver(limits=limits(max_received=0))
    unlimited.send(MAIL + b"DATA\r\n")
    assert unlimited.codes(b"Received: x\r\n" * 500 + b"\r\n.\r\n") == ["250 2.0.0"]


def test_received_fields_counts_only_the_header_block() -> None:
    assert received_fields(b"\r\nReceived: x\r\n") == 0  # no header at all
    assert received_fields(b"Received: x\r\nReceived: y\r\n") == 2  # no blank line: all header
    assert received_fields(b"X-Received: x\r\nreceived:y\r\n\r\nReceived: z\r\n") == 1


def test_command_line_limit() -> None:
    d = Driver()
    d.send(b"EHLO c\r\n")
    assert d.codes(b"NOOP " + b"x" * 507 + b"\r\n") == ["500 5.5.6"]  # 514 octets with CRLF
    assert d.codes(b"NOOP " + b"x" * 505 + b"\r\n") == ["250 2.0.0"]  # exactly 512
    assert d.codes(b"NOOP " + b"x" * 100_000 + b"\r\nNOOP\r\n") == ["500 5.5.6", "250 2.0.0"]


def test_vrfy_expn_reveal_nothing() -> None:
    d = Driver()
    d.send(b"EHLO c\r\n")
    assert d.codes(b"VRFY alice\r\n") == d.codes(b"VRFY nobody\r\n") == ["252 2.5.0"]
    assert d.codes(b"EXPN staff\r\n") == ["502 5.5.1"]


def test_error_limit_closes_with_421() -> None:
    d = Driver(limits=limits(max_errors=3))
    out = d.send(b"BOGUS\r\nBOGUS\r\nBOGUS\r\nNOOP\r\n")
    assert out.count(b"500 5.5.2") == 3
    assert out.endswith(b"421 4.7.0 Too many errors, closing connection\r\n")
    assert d.closed and b"250" not in out


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1", b"POST /x HTTP/1.0", b"CONNECT mx:25 HTTP/1.1"])
def test_http_first_command_closes(line: bytes) -> None:
    d = Driver()
    out = d.send(line + b"\r\nHost: x\r\n\r\n")
    assert out.startswith(b"554 5.7.0") and d.closed
    assert d.send(b"EHLO c\r\n") == b""


def test_bdat_chunks() -> None:
    d = Driver()
    d.send(MAIL)
    assert d.codes(b"BDAT 5\r\nHello") == ["250 2.0.0"]
    assert d.codes(b"BDAT 9 LAST\r\n, world\r\nNOOP\r\n") == ["250 2.0.0", "250 2.0.0"]
    assert [m.data for m in d.messages] == [b"Hello, world\r\n"]


def test_bdat_zero_last_and_data_after_bdat() -> None:
    d = Driver()
    d.send(MAIL)
    d.send(b"BDAT 3\r\nabc")
    assert d.codes(b"DATA\r\n") == ["503 5.5.1"]
    assert d.codes(b"BDAT 0 LAST\r\n") == ["250 2.0.0"]
    assert [m.data for m in d.messages] == [b"abc"]


def test_refused_bdat_chunk_is_consumed_not_executed() -> None:
    d = Driver()
    d.send(b"EHLO c\r\n")
    chunk = b"RSET\r\nMAIL FROM:<evil@x.test>\r\n"
    out = d.codes(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert out == ["503 5.5.1", "250 2.0.0"]
    assert not any(type(e).__name__ == "MailFrom" for e in d.events)


def test_bad_bdat_syntax_closes() -> None:
    d = Driver()
    d.send(MAIL)
    assert d.codes(b"BDAT x\r\n") == ["501 5.5.4"] and d.closed


def test_bdat_oversize() -> None:
    d = Driver(limits=limits(max_message_size=10))
    d.send(MAIL)
    assert d.codes(b"BDAT 20 LAST\r\n" + b"z" * 20 + b"NOOP\r\n") == ["552 5.3.4", "250 2.0.0"]
    assert d.messages == []


def test_smtputf8_addresses() -> None:
    d = Driver()
    d.send(b"EHLO c\r\n")
    assert d.codes("MAIL FROM:<jörg@bücher.test>\r\n".encode()) == ["553 5.6.7"]
    assert d.codes("MAIL FROM:<jörg@bücher.test> SMTPUTF8\r\n".encode()) == ["250 2.1.0"]
    assert d.codes(b"RCPT TO:<alice@local.test>\r\nDATA\r\n") == ["250 2.1.5", "354"]
    d.send("Subject: ü\r\n\r\n.\r\n".encode())
    assert d.messages[0].envelope.protocol == "UTF8SMTP"


def test_starttls_resets_state_and_drops_pipelined_plaintext() -> None:
    d = Driver(starttls=True)
    d.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRSET\r\n")
    out = d.send(b"STARTTLS\r\nMAIL FROM:<injected@x.test>\r\nRCPT TO:<alice@local.test>\r\n")
    assert out == b"220 2.0.0 Ready to start TLS\r\n"
    assert d.tls_started == 1 and d.core.is_tls
    # State reset: EHLO needed again, nothing pipelined before the handshake ran.
    assert d.codes(b"MAIL FROM:<a@b.test>\r\n") == ["503 5.5.1"]
    out2 = d.send(b"EHLO c\r\n").decode()
    assert "STARTTLS" not in out2
    assert sum(1 for e in d.events if type(e).__name__ == "MailFrom") == 1


def test_starttls_in_transaction_or_twice_refused() -> None:
    d = Driver(starttls=True)
    d.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    assert d.codes(b"STARTTLS\r\n") == ["503 5.5.1"]
    d = Driver(tls=True, starttls=False)
    d.send(b"EHLO c\r\n")
    assert d.codes(b"STARTTLS\r\n") == ["503 5.5.1"]


def test_submission_auth_requires_tls() -> None:
    d = Driver(submission=True, starttls=True)
    out = d.send(b"EHLO c\r\n").decode()
    assert "AUTH" not in out  # RFC 4954 §4 / issue: AUTH only offered after STARTTLS
    assert d.codes(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode()) == ["530 5.7.0"]
    assert d.codes(b"MAIL FROM:<alice@local.test>\r\n") == ["530 5.7.0"]
    d.send(b"STARTTLS\r\n")
    out = d.send(b"EHLO c\r\n").decode()
    assert "250 AUTH PLAIN LOGIN" in out or "250-AUTH PLAIN LOGIN" in out
    assert d.codes(f"AUTH PLAIN {plain('alice', 'wrong')}\r\n".encode()) == ["535 5.7.8"]
    assert d.codes(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode()) == ["235 2.7.0"]
    assert d.codes(b"STARTTLS\r\n") == ["503 5.5.1"]  # after TLS and AUTH
    assert d.codes(b"MAIL FROM:<alice@local.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\n") == [
        "250 2.1.0",
        "554 5.7.1",  # the driver refuses relay unless relay_ok; routing is the adapter's
        "554 5.5.1",
    ]


def test_starttls_after_auth_on_plaintext_loopback_refused() -> None:
    d = Driver(submission=True, starttls=True, plaintext_auth=True)
    d.send(b"EHLO c\r\n")
    assert d.codes(f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode()) == ["235 2.7.0"]
    assert d.codes(b"STARTTLS\r\n") == ["503 5.5.1"]


def test_auth_login_multistep_and_cancel() -> None:
    d = Driver(submission=True, tls=True, starttls=False)
    d.send(b"EHLO c\r\n")
    assert d.send(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert d.send(b"YWxpY2U=\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert d.codes(b"c2VjcmV0\r\n") == ["235 2.7.0"]
    assert d.codes(b"AUTH PLAIN\r\n") == ["503 5.5.1"]
    d2 = Driver(submission=True, tls=True, starttls=False)
    d2.send(b"EHLO c\r\n")
    assert d2.send(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert d2.codes(b"*\r\n") == ["501 5.0.0"]
    assert d2.codes(b"AUTH CRAM-MD5\r\n") == ["504 5.5.4"]
    assert d2.codes(b"AUTH PLAIN !!!\r\n") == ["501 5.5.2"]


def test_protocol_names() -> None:
    d = Driver(submission=True, tls=True, starttls=False)
    d.send(b"EHLO c\r\n" + f"AUTH PLAIN {plain('alice', 'secret')}\r\n".encode())
    d.send(b"MAIL FROM:<alice@local.test>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\nx\r\n.\r\n")
    assert d.messages[0].envelope.protocol == "ESMTPSA"
    assert d.messages[0].envelope.authenticated == "alice@local.test"
    h = Driver()
    h.send(b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\nx\r\n.\r\n")
    assert h.messages[0].envelope.protocol == "SMTP"


def test_timeout_and_shutdown_replies() -> None:
    d = Driver()
    d.core.timed_out()
    assert isinstance(d.core.next_event(), Close)
    assert d.core.data_to_send() == b"421 4.4.2 Timeout exceeded, closing connection\r\n"
    s = Driver()
    s.core.shutting_down()
    assert isinstance(s.core.next_event(), Close)
    assert s.core.data_to_send().startswith(b"421 4.3.2")


def test_answer_without_event_is_local_error() -> None:
    d = Driver()
    with pytest.raises(LocalProtocolError):
        d.core.answer_auth(None)
    core: SmtpServer = d.core
    core.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    ev = core.next_event()
    assert not isinstance(ev, NeedData)
    with pytest.raises(LocalProtocolError):
        core.next_event()


def test_message_failure_reply_resets_transaction() -> None:
    d = Driver()
    d.core.receive_data(MAIL + b"DATA\r\nx\r\n.\r\n")
    while not isinstance(ev := d.core.next_event(), Message):
        assert not isinstance(ev, NeedData)
        d.core.answer(replies.OK)
    d.core.answer(replies.LOCAL_ERROR)
    assert d.core.data_to_send().endswith(b"451 4.3.0 Local error in processing, try again later\r\n")
    assert d.codes(b"RCPT TO:<alice@local.test>\r\n") == ["503 5.5.1"]
