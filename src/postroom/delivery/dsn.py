"""Delivery status notifications (RFC 3464 in an RFC 6522 multipart/report), composed without I/O.

Invariants:
- A DSN is never composed for the null reverse-path: :func:`wants_dsn` is False for sender "", so a bounce
  can never bounce (RFC 5321 §4.5.5, RFC 3461 §6.2).
- NOTIFY is honoured (RFC 3461 §4.1): NEVER suppresses every notice; an empty NOTIFY means FAILURE only
  (and DELAY at the MTA's choice, which we do not use); SUCCESS asks for a notice on delivery/relay.
- RET=FULL returns the whole message (message/rfc822); otherwise only its header block
  (text/rfc822-headers, RFC 6522 §4), which is what most senders need and never leaks a large body.
- Every line is CRLF-terminated ASCII; diagnostic texts from peers are folded into one line and stripped of
  controls, so a hostile reply cannot inject fields into the report.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\U0010ffff]+")


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """One per-recipient block of a DSN (RFC 3464 §2.3)."""

    recipient: str
    action: Action
    status: str  # RFC 3463 "5.1.1"
    diagnostic: str = ""  # the remote reply, e.g. "550 5.1.1 no such user"
    remote_mta: str = ""  # the host that gave it
    orcpt: str = ""  # as received, e.g. "rfc822;bob@b.test"
    last_attempt: float = 0.0
    will_retry_until: float = 0.0  # for "delayed"
    reason: str = ""  # why, when no remote reply says it (e.g. "domain x accepts no mail (null MX)")


def wants_dsn(sender: str, notify: str, action: Action) -> bool:
    """Whether the envelope sender asked (or defaults) to hear about ``action`` (RFC 3461 §4.1)."""
    if not sender:
        return False
    words = {w.strip().upper() for w in notify.split(",") if w.strip()}
    if "NEVER" in words:
        return False
    if action == "failed":
        return not words or "FAILURE" in words
    if action == "delayed":
        return "DELAY" in words
    return "SUCCESS" in words


def _one_line(text: str) -> str:
    return _UNSAFE.sub(" ", text).strip()[:900]


def _header_block(message: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = message.find(sep)
        if end >= 0:
            return message[: end + len(sep)]
    return message


def _crlf(data: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def compose(
    *,
    reporting_mta: str,
    sender: str,
    original: bytes,
    statuses: Sequence[RecipientStatus],
    arrival: float,
    now: float,
    ret: str = "",
    envid: str = "",
) -> bytes:
    """The DSN message (bytes, CRLF) for ``statuses`` of one original message, to ``sender``."""
    actions = {s.action for s in statuses}
    if "failed" in actions:
        subject = "Undelivered Mail Returned to Sender"
        human = "Your message could not be delivered to the following recipients."
    elif "delayed" in actions:
        subject = "Delayed Mail (still being retried)"
        human = "Your message has not been delivered yet; delivery will be retried."
    else:
        subject = "Successful Mail Delivery Report"
        human = "Your message was delivered (or relayed) to the following recipients."
    boundary = "=_postroom_" + secrets.token_hex(12)
    host = _one_line(reporting_mta) or "localhost"
    lines_human = [human, ""]
    for s in statuses:
        lines_human.append(f"<{_one_line(s.recipient)}>: {s.action}")
        if s.diagnostic:
            lines_human.append(f"    {_one_line(s.remote_mta) or host} said: {_one_line(s.diagnostic)}")
        elif s.reason:
            lines_human.append(f"    {_one_line(s.reason)}")
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{_one_line(sender)}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(now, localtime=False)}",
        f"Message-ID: <{secrets.token_hex(16)}@{host}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        *lines_human,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {host}",
    ]
    if envid:
        head.append(f"Original-Envelope-Id: {_one_line(envid)}")
    head.append(f"Arrival-Date: {email.utils.formatdate(arrival, localtime=False)}")
    for s in statuses:
        head.append("")
        if s.orcpt:
            head.append(f"Original-Recipient: {_one_line(s.orcpt)}")
        head.append(f"Final-Recipient: rfc822; {_one_line(s.recipient)}")
        head.append(f"Action: {s.action}")
        head.append(f"Status: {_one_line(s.status)}")
        if s.remote_mta:
            head.append(f"Remote-MTA: dns; {_one_line(s.remote_mta)}")
        if s.diagnostic:
            head.append(f"Diagnostic-Code: smtp; {_one_line(s.diagnostic)}")
        if s.last_attempt:
            head.append(f"Last-Attempt-Date: {email.utils.formatdate(s.last_attempt, localtime=False)}")
        if s.will_retry_until and s.action == "delayed":
            head.append(f"Will-Retry-Until: {email.utils.formatdate(s.will_retry_until, localtime=False)}")
    head += ["", f"--{boundary}"]
    if ret.upper() == "FULL":
        head += ["Content-Type: message/rfc822", "Content-Description: Undelivered message", "", ""]
        body = _crlf(original)
    else:
        head += ["Content-Type: text/rfc822-headers", "Content-Description: Undelivered message headers", "", ""]
        body = _crlf(_header_block(original))
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return "\r\n".join(head).encode("ascii", "replace") + body + f"\r\n--{boundary}--\r\n".encode()
