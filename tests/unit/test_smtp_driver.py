"""A test driver for the sans-I/O SMTP core: feeds bytes, answers events like a simple policy, no loop."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from postroom.smtp.events import (
    AuthAttempt,
    Close,
    Event,
    MailFrom,
    Message,
    NeedData,
    RcptTo,
    StartTls,
)
from postroom.smtp.limits import SmtpConfig
from postroom.smtp.server import Settings, SmtpServer
from postroom.wire import replies

LOCAL_DOMAIN = "local.test"
USERS = {"alice", "bob", "postmaster"}


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class Driver:
    """Answers: MAIL → 250; RCPT → local users 250, other local 550 5.1.1, remote 554 5.7.1 (unless
    ``relay_ok``); message → 250 (recorded in ``messages``); AUTH alice/secret → ok; STARTTLS → done."""

    def __init__(self, relay_ok: bool = False, **settings: Any) -> None:
        limits = settings.pop("limits", SmtpConfig())
        self.core = SmtpServer(Settings(hostname="mx.local.test", limits=limits, **settings))
        self.greeting = self.core.data_to_send()
        self.relay_ok = relay_ok
        self.messages: list[Message] = []
        self.events: list[Event] = []
        self.closed = False
        self.tls_started = 0

    def send(self, data: bytes) -> bytes:
        """Feed ``data`` and return every reply byte produced."""
        core = self.core
        core.receive_data(data)
        out = b""
        while True:
            ev = core.next_event()
            if isinstance(ev, NeedData):
                break
            self.events.append(ev)
            if isinstance(ev, MailFrom):
                core.answer(replies.SENDER_OK)
            elif isinstance(ev, RcptTo):
                a = ev.address
                if a.domain in (LOCAL_DOMAIN, ""):
                    ok = a.local.lower() in USERS
                    core.answer(replies.RECIPIENT_OK if ok else replies.UNKNOWN_USER, token=str(a))
                elif self.relay_ok:
                    core.answer(replies.RECIPIENT_OK, token=str(a))
                else:
                    core.answer(replies.RELAY_DENIED)
            elif isinstance(ev, Message):
                self.messages.append(ev)
                core.answer(replies.Reply.of(250, "2.0.0", "OK"))
            elif isinstance(ev, AuthAttempt):
                ok = ev.credentials.username == "alice" and ev.credentials.password == "secret"
                core.answer_auth("alice@local.test" if ok else None)
            elif isinstance(ev, StartTls):
                out += core.data_to_send()
                core.tls_started()
                self.tls_started += 1
            elif isinstance(ev, Close):
                self.closed = True
                break
        return out + core.data_to_send()

    def codes(self, data: bytes) -> list[str]:
        """The reply lines' ``code enhanced`` heads, e.g. ``["250 2.1.0", "354"]`` (last lines only)."""
        lines = self.send(data).decode("utf-8").split("\r\n")
        out = []
        for line in lines:
            if len(line) >= 4 and line[3] == " ":
                parts = line.split(" ")
                head = parts[0]
                if len(parts) > 1 and parts[1][:1].isdigit() and "." in parts[1]:
                    head += " " + parts[1]
                out.append(head)
        return out


def limits(**kw: Any) -> SmtpConfig:
    return dataclasses.replace(SmtpConfig(), **kw)


def test_driver_greets() -> None:
    d = Driver()
    assert d.greeting.startswith(b"220 mx.local.test ESMTP")
