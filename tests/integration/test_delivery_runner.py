"""The queue runner's decisions on a real store, against aiosmtpd as the receiving side on 127.0.0.1:0.

DSN NOTIFY handling (SUCCESS → "relayed" report when the peer lacks DSN, NEVER → silence, DELAY → one
"delayed" report), the maximum queue age, bounces for remote senders queued with ``MAIL FROM:<>``, and no
report ever for the null sender.
"""

from __future__ import annotations

import asyncio
import email
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from postroom.app import App
from postroom.auth.passwords import hash_password
from postroom.auth.service import Authenticator
from postroom.config import Config, ListenersConfig
from postroom.delivery.limits import DeliveryConfig
from postroom.delivery.routing import Lookup, NoSuchDomain
from postroom.delivery.runner import QueueRunner
from postroom.store.api import OutboundEnvelope, OutboundRecipient, QueueEntry


class Receiver:
    """aiosmtpd handler: answers RCPT with ``rcpt_reply`` and records what was delivered."""

    def __init__(self) -> None:
        self.rcpt_reply = "250 OK"
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.port = 0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if not self.rcpt_reply.startswith("250"):
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 accepted"


class ToLoopback(Lookup):
    async def mx(self, domain: str) -> list[tuple[int, str]]:
        if domain != "b.test":
            raise NoSuchDomain(domain)
        return [(10, "mx.b.test")]

    async def addresses(self, host: str) -> list[str]:
        return ["127.0.0.1"]


@pytest.fixture
async def receiver() -> AsyncIterator[Any]:
    handler = Receiver()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, hostname="mx.b.test"), "127.0.0.1", 0)
    handler.port = server.sockets[0].getsockname()[1]
    yield handler
    server.close()
    await server.wait_closed()


@pytest.fixture
async def app(tmp_path: Path, receiver: Any) -> AsyncIterator[App]:
    from postroom.store.sqlite import open_store

    cfg = Config(
        hostname="mx.a.test",
        data_dir=str(tmp_path / "a"),
        domains=("a.test",),
        listeners=ListenersConfig(),
        delivery=DeliveryConfig(smtp_port=receiver.port, retry_schedule=(600.0,), connect_timeout=5.0),
        source="<test>",
    )
    store = open_store(cfg.store_url)
    await store.open()
    await store.create_account("alice@a.test", hash_password("alice-pw-123"))
    yield App(cfg, store, Authenticator(store, cfg.auth), ssl.create_default_context())
    await store.close()


async def queue(app: App, sender: str, notify: str = "", ret: str = "", rcpt: str = "bob@b.test") -> None:
    body = b"From: <alice@a.test>\r\nTo: <bob@b.test>\r\nSubject: runner\r\n\r\nbody text\r\n"
    env = OutboundEnvelope(sender, (OutboundRecipient(rcpt, notify=notify, orcpt=f"rfc822;{rcpt}"),), ret=ret)
    await app.store.append(body, [], outbound=env)


async def inbox(app: App, address: str = "alice@a.test") -> list[Any]:
    acct = await app.store.get_account(address)
    assert acct is not None
    mb = await app.store.get_mailbox(acct.id, "INBOX")
    assert mb is not None
    return [email.message_from_bytes(await app.store.read(m.blob_id)) for m in await app.store.messages(mb.id)]


def rcpt_fields(report: Any) -> Any:
    return report.get_payload()[1].get_payload()[1]


async def run(app: App, clock: Callable[[], float] | None = None) -> QueueRunner:
    runner = QueueRunner(app, lookup=ToLoopback(), **({"clock": clock} if clock else {}))
    await runner.run_once()
    await runner.stop()
    return runner


async def entries(app: App) -> list[QueueEntry]:
    result: list[QueueEntry] = await app.store.queue_list()
    return result


async def test_notify_success_gets_a_relayed_report(app: App, receiver: Any) -> None:
    await queue(app, "alice@a.test", notify="SUCCESS,FAILURE")
    runner = await run(app)
    assert runner.delivered == 1 and len(receiver.messages) == 1
    (report,) = await inbox(app)
    assert "Successful" in report["Subject"]
    fields = rcpt_fields(report)
    assert fields["Action"] == "relayed" and fields["Status"].startswith("2.")  # aiosmtpd has no DSN
    assert fields["Original-Recipient"] == "rfc822;bob@b.test"


async def test_default_notify_no_report_on_success(app: App, receiver: Any) -> None:
    await queue(app, "alice@a.test")
    await run(app)
    assert await inbox(app) == [] and len(receiver.messages) == 1


async def test_notify_never_is_silent_on_failure(app: App, receiver: Any) -> None:
    receiver.rcpt_reply = "550 5.1.1 no such user"
    await queue(app, "alice@a.test", notify="NEVER")
    runner = await run(app)
    assert runner.failed == 1 and await inbox(app) == []
    (e,) = await entries(app)
    assert e.status == "failed" and e.last_reply.startswith("550 5.1.1")


async def test_delay_report_once_then_expiry_fails_with_4_4_7(app: App, receiver: Any) -> None:
    receiver.rcpt_reply = "451 4.2.0 mailbox busy"
    await queue(app, "alice@a.test", notify="DELAY,FAILURE", ret="FULL")
    await run(app)
    (e,) = await entries(app)
    assert e.status == "deferred" and e.attempts == 1 and e.last_reply.startswith("451")
    (delayed,) = await inbox(app)
    assert rcpt_fields(delayed)["Action"] == "delayed" and rcpt_fields(delayed)["Will-Retry-Until"]
    await app.store.queue_retry()
    await run(app)  # a second deferral: no second "delayed" report
    assert len(await inbox(app)) == 1
    await app.store.queue_retry()
    later = e.created + app.config.delivery.max_queue_age + 1
    await run(app, clock=lambda: later)  # five days later it is still 451: give up
    (e,) = await entries(app)
    assert e.status == "failed" and e.attempts == 3
    reports = await inbox(app)
    assert len(reports) == 2
    failed = reports[1]
    assert rcpt_fields(failed)["Action"] == "failed" and rcpt_fields(failed)["Status"] == "4.2.0"
    returned = failed.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"  # RET=FULL
    assert "body text" in returned.as_string()


async def test_remote_sender_bounce_is_queued_with_null_sender(app: App, receiver: Any) -> None:
    receiver.rcpt_reply = "550 5.1.1 no such user"
    await queue(app, "carol@b.test", rcpt="nobody@b.test")
    await run(app)
    bounces = [e for e in await entries(app) if e.sender == ""]
    assert [(b.recipient, b.status) for b in bounces] == [("carol@b.test", "failed")]
    # the bounce itself was refused too (550 to everything), and there is no report about the report
    assert len(await entries(app)) == 2


async def test_bounce_delivered_with_mail_from_null(app: App, receiver: Any) -> None:
    await queue(app, "", rcpt="carol@b.test", notify="SUCCESS")
    runner = await run(app)
    assert runner.delivered == 1
    (mail_from, rcpts, _content) = receiver.messages[0]
    assert mail_from == "<>" or mail_from == ""
    assert rcpts == ["carol@b.test"] and await inbox(app) == []


async def test_stop_mid_attempt_makes_the_entry_due_again(app: App, receiver: Any) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow_data(server: Any, session: Any, envelope: Any) -> str:
        arrived.set()
        await release.wait()  # never answered while the runner runs
        return "250 OK"

    receiver.handle_DATA = slow_data
    await queue(app, "alice@a.test")
    runner = QueueRunner(app, lookup=ToLoopback())
    await runner.start()
    await asyncio.wait_for(arrived.wait(), 20)
    assert await app.store.queue_due(time.time()) == []  # claimed by the running attempt
    await runner.stop()
    release.set()
    (due,) = await app.store.queue_due(time.time())  # not after the claim's 10 minutes: now
    assert due.recipient == "bob@b.test" and due.status == "pending"
