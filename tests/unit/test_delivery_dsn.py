"""RFC 3464 DSN composition and the NOTIFY rules (RFC 3461)."""

from __future__ import annotations

import email
import email.message
from typing import Any

from postroom.delivery import dsn
from postroom.delivery.dsn import RecipientStatus

ORIGINAL = b"From: a@a.test\r\nTo: bob@b.test\r\nSubject: hello\r\nMessage-ID: <m1@a.test>\r\n\r\nsecret body\r\n"


def compose(ret: str = "", statuses: list[RecipientStatus] | None = None) -> Any:
    st = statuses or [
        RecipientStatus(
            "bob@b.test",
            "failed",
            "5.1.1",
            diagnostic="550 5.1.1 no such user\r\nInjected: yes",
            remote_mta="mx.b.test",
            orcpt="rfc822;bob@b.test",
            last_attempt=1_700_000_000,
        )
    ]
    raw = dsn.compose(
        reporting_mta="mx.a.test",
        sender="a@a.test",
        original=ORIGINAL,
        statuses=st,
        arrival=1_700_000_000,
        now=1_700_000_100,
        ret=ret,
        envid="ENV1",
    )
    assert raw.isascii() and b"\n" not in raw.replace(b"\r\n", b"")
    msg: Any = email.message_from_bytes(raw)
    return msg


def test_failure_report_structure() -> None:
    msg = compose()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "<a@a.test>" and msg["Auto-Submitted"] == "auto-replied"
    parts: Any = msg.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() == "message/delivery-status"
    fields = parts[1].get_payload()
    per_message, per_rcpt = fields[0], fields[1]
    assert per_message["Reporting-MTA"] == "dns; mx.a.test"
    assert per_message["Original-Envelope-Id"] == "ENV1"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@b.test"
    assert per_rcpt["Original-Recipient"] == "rfc822;bob@b.test"
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.b.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user Injected: yes"  # folded, not injected
    assert per_rcpt["Injected"] is None
    assert parts[2].get_content_type() == "text/rfc822-headers"
    returned = parts[2].get_payload()
    assert "Subject: hello" in returned and "secret body" not in returned


def test_ret_full_returns_whole_message() -> None:
    parts: Any = compose(ret="FULL").get_payload()
    assert isinstance(parts, list) and parts[2].get_content_type() == "message/rfc822"
    inner = parts[2].get_payload()[0]
    assert inner["Subject"] == "hello" and "secret body" in inner.get_payload()


def test_success_report() -> None:
    msg = compose(statuses=[RecipientStatus("bob@b.test", "relayed", "2.0.0", "250 ok", "mx.b.test")])
    assert "Successful" in msg["Subject"]
    assert msg.get_payload()[1].get_payload()[1]["Action"] == "relayed"


def test_notify_rules() -> None:
    assert dsn.wants_dsn("a@a.test", "", "failed")
    assert not dsn.wants_dsn("a@a.test", "", "relayed") and not dsn.wants_dsn("a@a.test", "", "delayed")
    assert not dsn.wants_dsn("a@a.test", "NEVER", "failed")
    assert dsn.wants_dsn("a@a.test", "SUCCESS,DELAY", "relayed")
    assert dsn.wants_dsn("a@a.test", "success,delay", "delayed")
    assert not dsn.wants_dsn("a@a.test", "SUCCESS", "failed")
    for action in ("failed", "delayed", "relayed"):
        assert not dsn.wants_dsn("", "SUCCESS,FAILURE,DELAY", action)  # never to <>
