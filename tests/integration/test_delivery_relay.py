"""Two Postroom instances on 127.0.0.2 (a.test) and 127.0.0.3 (b.test) with a real DNS server on loopback.

A message submitted on A (587 + STARTTLS + AUTH) for bob@b.test goes through A's queue, an MX lookup at the
test's authoritative DNS server (dnslib), STARTTLS to B's MX, and lands in bob's INBOX on B with DKIM
signatures that verify against the keys published in that DNS. With B stopped it is deferred and delivered
once B is back (``queue_retry`` or the retry schedule); with B answering 550 the sender gets a DSN on A.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.server import DNSLogger, DNSServer

from postroom.app import App, ListenerSpec, TlsMode
from postroom.auth.passwords import hash_password
from postroom.auth.service import Authenticator
from postroom.config import Config, ListenersConfig
from postroom.delivery.dkimsign import keygen, zone_line
from postroom.delivery.limits import DeliveryConfig
from postroom.delivery.runner import QueueRunner
from postroom.log import TRACE
from postroom.net.server import Listener
from postroom.store.api import QueueEntry
from postroom.store.sqlite import open_store

smtp_adapter = pytest.importorskip("postroom.smtp.adapter")
pytestmark = pytest.mark.timeout(60)

A_IP, B_IP = "127.0.0.2", "127.0.0.3"
PASSWORD = "alice-secret-pw"


class Zone:
    """An authoritative resolver for the test domains: NXDOMAIN for unknown names, NODATA for other types."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}

    def add(self, text: str) -> None:
        name = text.split()[0].lower().rstrip(".")
        self.records.setdefault(name, []).append(text)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        if qname not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for text in self.records[qname]:
            for rr in RR.fromZone(text):
                if QTYPE[rr.rtype] == qtype:
                    reply.add_answer(rr)
        return reply


@pytest.fixture
def zone() -> Iterator[tuple[Zone, int]]:
    z = Zone()
    quiet = DNSLogger("-recv,-send,-request,-reply,-truncated,-data", False)
    for _ in range(50):  # one port for UDP and TCP: take a free UDP port, then try TCP on it
        udp = DNSServer(z, address="127.0.0.1", port=0, logger=quiet)
        port = int(udp.server.server_address[1])
        try:
            tcp = DNSServer(z, address="127.0.0.1", port=port, tcp=True, logger=quiet)
            break
        except OSError:
            udp.server.server_close()
    else:
        pytest.fail("no port free for both UDP and TCP")
    udp.start_thread()
    tcp.start_thread()
    yield z, port
    udp.stop()
    tcp.stop()
    udp.server.server_close()
    tcp.server.server_close()


@dataclasses.dataclass
class Instance:
    app: App
    listeners: dict[str, Listener]
    runner: QueueRunner | None = None

    @property
    def store(self) -> Any:
        return self.app.store

    async def start_listener(self, service: str, host: str, port: int) -> int:
        tls: TlsMode = "implicit" if service == "submissions" else "starttls"
        lst = Listener(ListenerSpec(service, host, port, tls), self.app, smtp_adapter.SmtpSession)
        await lst.start()
        self.listeners[service] = lst
        return lst.port

    async def stop_listener(self, service: str) -> None:
        lst = self.listeners.pop(service)
        await lst.close()
        for task in list(lst.sessions):
            task.cancel()
        if lst.sessions:
            await asyncio.wait(lst.sessions, timeout=5)

    async def inbox(self, address: str) -> list[bytes]:
        acct = await self.store.get_account(address)
        mb = await self.store.get_mailbox(acct.id, "INBOX")
        return [await self.store.read(m.blob_id) for m in await self.store.messages(mb.id)]


@pytest.fixture
async def instances(
    tmp_path: Path, tls_files: tuple[Path, Path], zone: tuple[Zone, int]
) -> AsyncIterator[Callable[..., Awaitable[tuple[Instance, Instance]]]]:
    from conftest import server_tls_context

    made: list[Instance] = []
    z, dns_port = zone

    async def make(smarthost: bool = False, **delivery: Any) -> tuple[Instance, Instance]:
        def config(name: str, domain: str, **kw: Any) -> Config:
            return Config(
                hostname=f"mx.{domain}",
                data_dir=str(tmp_path / name),
                domains=(domain,),
                listeners=ListenersConfig(),
                delivery=DeliveryConfig(**kw),
                source="<test>",
            )

        async def instance(cfg: Config) -> Instance:
            store = open_store(cfg.store_url)
            await store.open()
            inst = Instance(App(cfg, store, Authenticator(store, cfg.auth), server_tls_context(*tls_files)), {})
            made.append(inst)
            return inst

        b = await instance(config("b", "b.test"))
        b_port = await b.start_listener("smtp", B_IP, 0)
        await b.store.create_account("bob@b.test", hash_password("bob-pw-123"))
        delivery.setdefault("retry_schedule", (3600.0,))
        if smarthost:  # B's 465 (implicit TLS) is A's smarthost, by name, with a verified certificate
            relay_port = await b.start_listener("submissions", B_IP, 0)
            # like Office 365, B lets an account send only as itself: the smarthost login is alice's address
            await b.store.create_account("alice@a.test", hash_password("relay-pw-456"))
            pw_file = tmp_path / "smarthost.pw"
            pw_file.write_text("relay-pw-456\n")
            z.add(f"localhost. 300 IN A {B_IP}")  # the name the test certificate carries
            delivery.update(
                smarthost=f"smtps://alice%40a.test@localhost:{relay_port}",
                smarthost_password_file=str(pw_file),
                tls_ca_file=str(tls_files[0]),
            )
        a_cfg = config(
            "a", "a.test", nameservers=(f"127.0.0.1:{dns_port}",), smtp_port=b_port, connect_timeout=5.0, **delivery
        )
        for name, value in keygen(a_cfg.data_path, "a.test", a_cfg.delivery.dkim_selector):
            z.add(zone_line(name, value))
        a = await instance(a_cfg)
        await a.start_listener("submission", A_IP, 0)
        await a.store.create_account("alice@a.test", hash_password(PASSWORD))
        z.add("b.test. 300 IN MX 10 mx.b.test.")
        z.add(f"mx.b.test. 300 IN A {B_IP}")
        z.add("a.test. 300 IN MX 10 mx.a.test.")
        z.add(f"mx.a.test. 300 IN A {A_IP}")
        a.runner = QueueRunner(a.app)
        await a.runner.start()
        return a, b

    yield make
    for inst in made:
        if inst.runner is not None:
            await inst.runner.stop()
        for service in list(inst.listeners):
            await inst.stop_listener(service)
        await inst.store.close()


def submit(a: Instance, rcpt: str, subject: str, extra: str = "") -> None:
    """Alice submits on A with STARTTLS and AUTH, like a mail program (blocking smtplib; run in a thread)."""
    port = a.listeners["submission"].port
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    msg = (
        f"From: Alice <alice@a.test>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{time.time_ns()}@a.test>\r\nDate: Thu, 26 Nov 2026 18:00:00 +0000\r\n{extra}\r\n"
        "Hello Bob,\r\n.a line starting with a dot\r\nBye.\r\n"
    )
    with smtplib.SMTP(A_IP, port, timeout=10) as s:
        s.starttls(context=ctx)
        s.login("alice@a.test", PASSWORD)
        s.sendmail("alice@a.test", [rcpt], msg.encode())


async def wait_for(cond: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    """Wait until ``cond()`` is truthy (checked on a short interval, bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def txt_over_tcp(dns_port: int) -> Callable[..., bytes | None]:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        q = dns.message.make_query(name.decode(), dns.rdatatype.TXT)
        r = dns.query.tcp(q, "127.0.0.1", port=dns_port, timeout=timeout)
        for rrset in r.answer:
            for rr in rrset:
                return b"".join(rr.strings)
        return None

    return dnsfunc


async def queue_entries(a: Instance) -> list[QueueEntry]:
    entries: list[QueueEntry] = await a.store.queue_list()
    return entries


async def test_a_to_b_with_starttls_and_dkim(
    instances: Callable[..., Awaitable[tuple[Instance, Instance]]], zone: tuple[Zone, int]
) -> None:
    a, b = await instances()
    await asyncio.to_thread(submit, a, "bob@b.test", "across")
    (msg,) = await wait_for(lambda: b.inbox("bob@b.test"))
    parsed: Any = email.message_from_bytes(msg)
    assert parsed["Subject"] == "across"
    assert "\r\n..a line" not in msg.decode() and "\r\n.a line starting with a dot\r\n" in msg.decode()
    received_by_b = parsed.get_all("Received")[0]
    assert "by mx.b.test" in received_by_b and "using TLS" in received_by_b and "ESMTPS" in received_by_b
    sigs = parsed.get_all("DKIM-Signature")
    assert len(sigs) == 2 and any("a=ed25519-sha256" in s for s in sigs) and any("a=rsa-sha256" in s for s in sigs)
    dnsfunc = txt_over_tcp(zone[1])
    # dkimpy verifies the first DKIM-Signature it finds; check both by removing the other one
    start = msg.index(b"DKIM-Signature:")
    second = msg.index(b"DKIM-Signature:", start + 1)
    end = msg.index(b"\r\n", second)
    while msg[end + 2 : end + 3] in (b" ", b"\t"):
        end = msg.index(b"\r\n", end + 2)
    assert await asyncio.to_thread(dkim.verify, msg, dnsfunc=dnsfunc)
    without_first = msg[:start] + msg[second:]
    assert await asyncio.to_thread(dkim.verify, without_first, dnsfunc=dnsfunc)
    tampered = msg.replace(b"Hello Bob", b"Hello Eve")
    assert not await asyncio.to_thread(dkim.verify, tampered, dnsfunc=dnsfunc)
    (entry,) = await queue_entries(a)
    assert entry.status == "delivered" and entry.last_reply.startswith("250")


async def test_deferred_while_b_is_down_then_queue_retry(
    instances: Callable[..., Awaitable[tuple[Instance, Instance]]],
) -> None:
    a, b = await instances()
    port = b.listeners["smtp"].port
    await b.stop_listener("smtp")
    await asyncio.to_thread(submit, a, "bob@b.test", "later")
    (entry,) = await wait_for(
        lambda: _entries_with(a, lambda e: e.status == "deferred"),
    )
    assert entry.attempts == 1 and entry.next_attempt > time.time() + 3000  # the schedule says an hour
    assert await b.inbox("bob@b.test") == []
    await b.start_listener("smtp", B_IP, port)
    assert await a.store.queue_retry() == 1  # what `postroom queue retry` does
    (msg,) = await wait_for(lambda: b.inbox("bob@b.test"))
    assert b"Subject: later" in msg
    (entry,) = await wait_for(lambda: _entries_with(a, lambda e: e.status == "delivered"))
    assert entry.attempts == 2


async def test_deferred_then_the_schedule_delivers(
    instances: Callable[..., Awaitable[tuple[Instance, Instance]]],
) -> None:
    a, b = await instances(retry_schedule=(0.5,))
    port = b.listeners["smtp"].port
    await b.stop_listener("smtp")
    await asyncio.to_thread(submit, a, "bob@b.test", "scheduled")
    await wait_for(lambda: _entries_with(a, lambda e: e.status == "deferred"))
    await b.start_listener("smtp", B_IP, port)
    (msg,) = await wait_for(lambda: b.inbox("bob@b.test"))  # nobody calls retry: the runner's timer does
    assert b"Subject: scheduled" in msg


async def test_550_gives_the_sender_a_dsn(instances: Callable[..., Awaitable[tuple[Instance, Instance]]]) -> None:
    a, _b = await instances()
    await asyncio.to_thread(submit, a, "nobody@b.test", "to nobody")
    (report,) = await wait_for(lambda: a.inbox("alice@a.test"))
    parsed: Any = email.message_from_bytes(report)
    assert parsed.get_content_type() == "multipart/report" and parsed["To"] == "<alice@a.test>"
    status = parsed.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    per_rcpt = status.get_payload()[1]
    assert per_rcpt["Final-Recipient"] == "rfc822; nobody@b.test"
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"].startswith("5.")
    assert per_rcpt["Remote-MTA"] == "dns; mx.b.test" and "550" in per_rcpt["Diagnostic-Code"]
    headers = parsed.get_payload()[2]
    assert headers.get_content_type() == "text/rfc822-headers" and "Subject: to nobody" in headers.get_payload()
    (entry,) = await _entries_with(a, lambda e: e.status == "failed")
    assert entry.attempts == 1  # a 5xx is not retried


async def test_null_mx_fails_at_once(
    instances: Callable[..., Awaitable[tuple[Instance, Instance]]], zone: tuple[Zone, int]
) -> None:
    a, _b = await instances()
    zone[0].add("nomail.test. 300 IN MX 0 .")
    await asyncio.to_thread(submit, a, "x@nomail.test", "null mx")
    (report,) = await wait_for(lambda: a.inbox("alice@a.test"))
    assert b"Status: 5.1.10" in report and b"Action: failed" in report
    assert b"accepts no mail (null MX, RFC 7505)" in report  # the reason, in the human-readable part


async def _entries_with(a: Instance, pred: Callable[[QueueEntry], bool]) -> list[QueueEntry]:
    entries = await queue_entries(a)
    return [e for e in entries if pred(e)] if entries and all(pred(e) for e in entries) else []


async def test_smarthost_with_implicit_tls_verify_and_auth(
    instances: Callable[..., Awaitable[tuple[Instance, Instance]]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(TRACE, logger="postroom.delivery.client")
    a, b = await instances(smarthost=True)
    # c.test has no DNS at all: with a smarthost nothing is looked up but the smarthost's own name
    await asyncio.to_thread(submit, a, "carol@c.test", "via smarthost")
    (queued,) = await wait_for(lambda: b.store.queue_list())
    assert (queued.sender, queued.recipient, queued.status) == ("alice@a.test", "carol@c.test", "pending")
    raw = await b.store.read_queued(queued.message_id)
    assert b"Subject: via smarthost" in raw and raw.count(b"DKIM-Signature:") == 2
    first_received = raw.split(b"\r\nReceived:", 1)[0] if raw.startswith(b"Received:") else b""
    assert b"by mx.b.test" in first_received and b"ESMTPSA" in first_received  # authenticated, TLS
    (entry,) = await wait_for(lambda: _entries_with(a, lambda e: e.status == "delivered"))
    assert entry.last_reply.startswith("250")
    # the TRACE transcript shows the session but never the password or the message body
    token = base64.b64encode(b"\0alice@a.test\0relay-pw-456").decode()
    assert "> AUTH PLAIN ****" in caplog.text and "< 235" in caplog.text
    assert "relay-pw-456" not in caplog.text and token not in caplog.text and "Hello Bob" not in caplog.text
