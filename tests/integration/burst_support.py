"""Helpers for the burst integration tests: tagged reports made with reportlab, an aiosmtpd sink.

Reports: each customer gets ``pages`` pages whose visible text says ``Customer <n> page <k>/<pages>``, so a
received PDF can be checked page by page. The tag is drawn in one of several ways (``style``): normal
text, white 1-pt text, or broken over three lines as a word processor might wrap it.
"""

from __future__ import annotations

import asyncio
import email
import io
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pypdf
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Customer:
    n: int
    address: str
    pages: int = 1
    syntax: str = "pdfexplode"  # or "native"
    style: str = "normal"  # "white", "broken"
    amount: str = "10.00"
    tag_every_page: bool = False

    def tag(self) -> str:
        if self.syntax == "native":
            return f"[[postroom to={self.address}; template=INV; var.v1=`Customer {self.n}`; var.v2={self.amount}]]"
        return f"<pdfexplode>`Customer {self.n}`,{self.amount}%INV#{self.address}</pdfexplode>"


def customers(count: int, domain: str = "example.test") -> list[Customer]:
    """A varied list: both syntaxes, 1-3 pages, some white 1-pt and some broken tags."""
    out = []
    for i in range(count):
        out.append(
            Customer(
                n=i,
                address=f"cust{i}@{domain}",
                pages=1 + (i % 3 == 0) + (i % 7 == 0),
                syntax="native" if i % 2 else "pdfexplode",
                style=("normal", "white", "broken")[i % 3],
                amount=f"{i * 1.5:.2f}",
                tag_every_page=i % 5 == 0,
            )
        )
    return out


def draw_tag(c: canvas.Canvas, tag: str, style: str) -> None:
    c.saveState()
    if style == "white":
        c.setFillColorRGB(1, 1, 1)
        c.setFont("Helvetica", 1)
        c.drawString(40, 30, tag)
    elif style == "broken":
        c.setFont("Helvetica", 8)
        third = len(tag) // 3
        for k, part in enumerate((tag[:third], tag[third : 2 * third], tag[2 * third :])):
            c.drawString(40, 60 - 10 * k, part)
    else:
        c.setFont("Helvetica", 8)
        c.drawString(40, 40, tag)
    c.restoreState()


def make_report(
    path: Path, people: list[Customer], *, cover: bool = False, extra: Callable[[canvas.Canvas], None] | None = None
) -> Path:
    """Write the tagged report; returns ``path``."""
    c = canvas.Canvas(str(path), pagesize=A4)
    if cover:
        c.setFont("Helvetica", 14)
        c.drawString(72, 780, "Cover page: invoices of the month")
        c.showPage()
    for cu in people:
        for k in range(1, cu.pages + 1):
            c.setFont("Helvetica-Bold", 14)
            c.drawString(72, 780, f"Customer {cu.n} page {k}/{cu.pages}")
            c.setFont("Helvetica", 9)
            for line in range(10):
                c.drawString(72, 740 - 14 * line, f"Item {line}: widget {cu.n * 10 + line}, amount {cu.amount}")
            if k == 1 or cu.tag_every_page:
                draw_tag(c, cu.tag(), cu.style)
            c.showPage()
    if extra is not None:
        extra(c)
    c.save()
    return path


JOB_TOML = """
from = "Billing <{sender}>"
[templates.INV]
subject = "Invoice for {{{{ v1 }}}}: {{{{ v2 }}}} EUR"
text = "Dear {{{{ v1 }}}},\\nyour invoice ({{{{ pages }}}}) is attached.\\n"
filename = "Invoice-{{v1}}.pdf"
"""


def write_job(directory: Path, sender: str = "billing@example.test", extra: str = "") -> Path:
    p = directory / "burst.toml"
    p.write_text(JOB_TOML.format(sender=sender) + extra)
    return p


def burst_command(pdf: Path, job: Path, url: str, out: Path, *extra: str) -> list[str]:
    """The ``postroom burst`` command line the tests run as a child process (to kill or interrupt it)."""
    return [sys.executable, "-m", "postroom.burst", str(pdf), "--config", str(job), "--transport", url,
            "--out", str(out), "--plain", *extra]  # fmt: skip


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def pdf_page_titles(raw: bytes) -> list[str]:
    """The first line ('Customer n page k/m') of every page of the message's PDF attachment."""
    msg = parse(raw)
    pdfs = [p for p in msg.iter_attachments() if p.get_content_type() == "application/pdf"]
    assert len(pdfs) == 1, [p.get_content_type() for p in msg.iter_attachments()]
    data = pdfs[0].get_content()
    reader = pypdf.PdfReader(io.BytesIO(data))
    return [(page.extract_text() or "").strip().splitlines()[0] for page in reader.pages]


def expected_titles(cu: Customer) -> list[str]:
    return [f"Customer {cu.n} page {k}/{cu.pages}" for k in range(1, cu.pages + 1)]


# --- an SMTP sink on 127.0.0.1:0 -----------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class Sink:
    """An aiosmtpd server in its own thread. ``decide(envelope) -> reply or None`` can refuse messages."""

    tls: ssl.SSLContext | None = None
    implicit_tls: bool = False
    require_auth: bool = False
    users: dict[str, str] = field(default_factory=dict)
    decide: Callable[[Envelope], str | None] | None = None
    rcpt_decide: Callable[[str], str | None] | None = None
    hold_after: int | None = None  # after this many messages, each further one is stored, then held
    gate: threading.Event = field(default_factory=threading.Event)
    received: list[Received] = field(default_factory=list)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _start(self) -> asyncio.Server:
        sink = self

        class Handler:
            async def handle_RCPT(
                self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
            ) -> str:
                if sink.rcpt_decide is not None:
                    reply = sink.rcpt_decide(address)
                    if reply is not None:
                        return reply
                envelope.rcpt_tos.append(address)
                return "250 OK"

            async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
                if sink.decide is not None:
                    reply = sink.decide(envelope)
                    if reply is not None:
                        return reply
                with sink.lock:
                    sink.received.append(
                        Received(
                            str(envelope.mail_from), list(envelope.rcpt_tos), bytes(envelope.original_content or b"")
                        )
                    )
                    held = sink.hold_after is not None and len(sink.received) > sink.hold_after
                if held:  # like a real MTA: committed, but the reply is late (the client may die meanwhile)
                    await asyncio.to_thread(sink.gate.wait, 30)
                return "250 2.0.0 queued"

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
            login = auth_data.login.decode() if isinstance(auth_data.login, bytes) else auth_data.login
            pw = auth_data.password.decode() if isinstance(auth_data.password, bytes) else auth_data.password
            ok = self.users.get(login) == pw
            return AuthResult(success=ok, handled=False)

        def factory() -> SMTP:
            return SMTP(
                Handler(),
                hostname="sink.test",
                tls_context=None if self.implicit_tls else self.tls,
                require_starttls=self.tls is not None and not self.implicit_tls,
                auth_required=self.require_auth,
                auth_require_tls=not self.implicit_tls and self.tls is not None,
                authenticator=authenticator if self.users else None,
                decode_data=False,
                enable_SMTPUTF8=True,
            )

        return await asyncio.get_running_loop().create_server(
            factory, HOST, 0, ssl=self.tls if self.implicit_tls else None
        )

    def messages(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def close(self) -> None:
        self.gate.set()

        async def stop() -> None:
            self.server.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
