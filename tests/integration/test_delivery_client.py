"""The outbound SMTP client against scripted servers on 127.0.0.1:0: what really goes on the wire.

Covers the client-side defences: CRLF-only and dot-stuffed DATA for bodies with bare LF, bare CR and leading
dots; CR/LF in an address refused before any connection; bytes a malicious server pipelines after
``220 Ready to start TLS`` discarded; PIPELINING really grouping MAIL/RCPT/DATA; 8-bit conversion for a
peer without 8BITMIME; TLS policy ``require``.
"""

from __future__ import annotations

import asyncio
import email
import re
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from postroom.delivery.client import Rcpt, SmtpClient
from postroom.delivery.limits import DeliveryConfig
from postroom.delivery.outbound import Outbound
from postroom.delivery.routing import Lookup, NoSuchDomain


class ScriptedMX:
    """A minimal SMTP server that records every byte and every message exactly as received."""

    def __init__(
        self,
        ext: list[str],
        *,
        tls: ssl.SSLContext | None = None,
        inject_after_starttls: bytes = b"",
        hold_until_data: bool = False,
        rcpt_reply: Callable[[str], bytes] = lambda _a: b"250 2.1.5 Ok",
    ) -> None:
        self.ext = ext
        self.tls = tls
        self.inject = inject_after_starttls
        self.hold_until_data = hold_until_data
        self.rcpt_reply = rcpt_reply
        self.lines: list[bytes] = []
        self.payloads: list[bytes] = []
        self.connections = 0
        self.tls_done = False
        self.server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1") -> int:
        self.server = await asyncio.start_server(self._serve, host, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 mx.b.test ESMTP scripted\r\n")
        held: list[bytes] = []
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                self.lines.append(line)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    ext = list(self.ext)
                    if self.tls is not None and not self.tls_done:
                        ext.append("STARTTLS")
                    if self.tls_done:
                        ext.append("X-AFTER-TLS")
                    out = [b"250-mx.b.test"] + [b"250-" + e.encode() for e in ext]
                    out[-1] = b"250 " + out[-1][4:]
                    writer.write(b"\r\n".join(out) + b"\r\n")
                elif verb == b"STAR":
                    assert self.tls is not None
                    writer.write(b"220 2.0.0 Ready to start TLS\r\n" + self.inject)
                    await writer.drain()
                    await writer.start_tls(self.tls)
                    self.tls_done = True
                elif verb in (b"MAIL", b"RCPT"):
                    reply = b"250 2.1.0 Ok" if verb == b"MAIL" else self.rcpt_reply(line.decode())
                    if self.hold_until_data:
                        held.append(reply)
                    else:
                        writer.write(reply + b"\r\n")
                elif verb == b"DATA":
                    for r in held:
                        writer.write(r + b"\r\n")
                    held.clear()
                    writer.write(b"354 go ahead\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    self.payloads.append(data)
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"RSET":
                    writer.write(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"502 5.5.2 unknown\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            writer.close()


@pytest.fixture
async def mx_factory() -> AsyncIterator[Callable[..., Any]]:
    servers: list[ScriptedMX] = []

    async def make(*args: Any, host: str = "127.0.0.1", **kwargs: Any) -> tuple[ScriptedMX, int]:
        mx = ScriptedMX(*args, **kwargs)
        servers.append(mx)
        return mx, await mx.start(host)

    yield make
    for s in servers:
        await s.close()


def tls_server_ctx(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(tls_files[0]), str(tls_files[1]))
    return ctx


class OneHost(Lookup):
    async def mx(self, domain: str) -> list[tuple[int, str]]:
        if domain != "b.test":
            raise NoSuchDomain(domain)
        return [(10, "mx.b.test")]

    async def addresses(self, host: str) -> list[str]:
        return ["127.0.0.1"]


def outbound(port: int, **kw: Any) -> Outbound:
    cfg = DeliveryConfig(smtp_port=port, connect_timeout=5, command_timeout=5, **kw)
    return Outbound(cfg, "mx.a.test", OneHost())


BODY = (
    b"From: a@a.test\r\nTo: bob@b.test\r\nSubject: dots\r\n\r\n.starts with dot\nbare LF\rbare CR\r\n..two\r\n.\r\nend"
)


async def test_dot_stuffing_and_crlf_on_the_wire(mx_factory: Callable[..., Any]) -> None:
    mx, port = await mx_factory(["PIPELINING", "8BITMIME"])
    ob = outbound(port)
    (res,) = await ob.deliver("b.test", "a@a.test", [Rcpt("bob@b.test")], BODY)
    await ob.close()
    assert res.status == "delivered", res
    (wire_bytes,) = mx.payloads
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire_bytes) is None  # only CRLF
    assert wire_bytes.count(b"\r\n.\r\n") == 1 and wire_bytes.endswith(b"\r\n.\r\n")
    lines = wire_bytes[:-3].split(b"\r\n")
    assert b"..starts with dot" in lines and b"...two" in lines and b".." in lines
    assert b"bare LF" in lines and b"bare CR" in lines


async def test_address_with_crlf_refused_before_connecting(mx_factory: Callable[..., Any]) -> None:
    mx, port = await mx_factory(["PIPELINING"])
    ob = outbound(port)
    evil = "bob@b.test>\r\nRCPT TO:<victim@b.test"
    (res,) = await ob.deliver("b.test", "a@a.test", [Rcpt(evil)], b"Subject: x\r\n\r\nx\r\n")
    assert res.status == "failed" and res.enhanced == "5.1.3"
    res2 = await ob.deliver("b.test", "a@a.test\r\nRSET", [Rcpt("bob@b.test")], b"Subject: x\r\n\r\nx\r\n")
    assert res2[0].status == "failed" and res2[0].enhanced == "5.1.7"
    await ob.close()
    assert mx.connections == 0 and mx.lines == []


async def test_one_bad_recipient_does_not_taint_the_others(mx_factory: Callable[..., Any]) -> None:
    mx, port = await mx_factory(["PIPELINING"])
    ob = outbound(port)
    res = await ob.deliver("b.test", "a@a.test", [Rcpt("x@b.test\n"), Rcpt("bob@b.test")], b"S: x\r\n\r\nx\r\n")
    await ob.close()
    assert [r.status for r in res] == ["failed", "delivered"]
    assert not any(b"x@b.test\n" in line[:-2] for line in mx.lines)
    assert all(line.endswith(b"\r\n") and b"\r" not in line[:-2] and b"\n" not in line[:-2] for line in mx.lines)


async def test_starttls_injection_is_discarded(mx_factory: Callable[..., Any], tls_files: tuple[Path, Path]) -> None:
    injected = b"250-mx.b.test\r\n250 FAKE-EXTENSION\r\n250 2.1.0 injected\r\n"
    mx, port = await mx_factory(["PIPELINING"], tls=tls_server_ctx(tls_files), inject_after_starttls=injected)
    assert mx.tls_done is False
    client = await SmtpClient.connect("127.0.0.1", port, connect_timeout=5, command_timeout=5)
    await client.ehlo("mx.a.test")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reply = await client.starttls(ctx, None)
    assert reply.code == 220 and client.is_tls
    reply = await client.ehlo("mx.a.test")
    # the EHLO reply is the genuine one from inside TLS, not the injected plaintext
    assert client.ext.has("X-AFTER-TLS") and not client.ext.has("FAKE-EXTENSION")
    res = await client.transaction(
        "a@a.test", [Rcpt("bob@b.test")], b"S: x\r\n\r\nhi\r\n", eight_bit=False, smtputf8=False
    )
    assert res.data is not None and res.data.code == 250 and res.mail.code == 250
    await client.quit()
    assert mx.tls_done and len(mx.payloads) == 1


async def test_pipelining_groups_mail_rcpt_data(mx_factory: Callable[..., Any]) -> None:
    # this server answers MAIL and RCPT only once DATA arrived: a client that waits per command times out
    def reply(line: str) -> bytes:
        return b"550 5.1.1 no such user" if "nobody" in line else b"250 2.1.5 Ok"

    mx, port = await mx_factory(["PIPELINING"], hold_until_data=True, rcpt_reply=reply)
    ob = outbound(port)
    rcpts = [Rcpt("bob@b.test"), Rcpt("nobody@b.test"), Rcpt("carol@b.test")]
    res = await ob.deliver("b.test", "a@a.test", rcpts, b"S: x\r\n\r\nx\r\n")
    # a second message reuses the same connection
    res2 = await ob.deliver("b.test", "a@a.test", [Rcpt("bob@b.test")], b"S: y\r\n\r\ny\r\n")
    await ob.close()
    assert [r.status for r in res] == ["delivered", "failed", "delivered"]
    assert res[1].reply.startswith("550 5.1.1") and res[1].enhanced == "5.1.1"
    assert res2[0].status == "delivered"
    assert mx.connections == 1 and len(mx.payloads) == 2


async def test_eight_bit_to_peer_without_8bitmime_is_converted(mx_factory: Callable[..., Any]) -> None:
    mx, port = await mx_factory(["PIPELINING"])  # no 8BITMIME
    ob = outbound(port)
    msg = (
        b"From: a@a.test\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nK\xc3\xb6ln \xe2\x82\xac\r\n"
    )
    (res,) = await ob.deliver("b.test", "a@a.test", [Rcpt("bob@b.test")], msg)
    bad = b"Subject: K\xc3\xb6ln\r\n\r\nx\r\n"  # 8-bit header: needs SMTPUTF8, which the peer lacks
    (res_bad,) = await ob.deliver("b.test", "a@a.test", [Rcpt("bob@b.test")], bad)
    await ob.close()
    assert res.status == "delivered"
    (payload,) = mx.payloads
    assert payload.isascii()
    parsed = email.message_from_bytes(payload[:-3].replace(b"\r\n..", b"\r\n."))
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    decoded = parsed.get_payload(decode=True)
    assert isinstance(decoded, bytes) and decoded.decode("utf-8").strip() == "Köln €"
    assert not any(line.startswith(b"MAIL") and b"BODY=8BITMIME" in line for line in mx.lines)
    assert res_bad.status == "failed" and res_bad.enhanced == "5.6.7"


async def test_tls_required_but_not_offered_defers(mx_factory: Callable[..., Any]) -> None:
    mx, port = await mx_factory(["PIPELINING"])
    ob = outbound(port, tls_policy="require")
    (res,) = await ob.deliver("b.test", "a@a.test", [Rcpt("bob@b.test")], b"S: x\r\n\r\nx\r\n")
    await ob.close()
    assert res.status == "deferred" and "STARTTLS" in res.reply
    assert not any(line.startswith(b"MAIL") for line in mx.lines)


async def test_opportunistic_starttls_used_when_offered(
    mx_factory: Callable[..., Any], tls_files: tuple[Path, Path]
) -> None:
    mx, port = await mx_factory(["PIPELINING"], tls=tls_server_ctx(tls_files))
    ob = outbound(port)
    (res,) = await ob.deliver("b.test", "a@a.test", [Rcpt("bob@b.test")], b"S: x\r\n\r\nx\r\n")
    await ob.close()
    assert res.status == "delivered" and mx.tls_done
    assert [line[:4] for line in mx.lines[:3]] == [b"EHLO", b"STAR", b"EHLO"]


async def test_connection_refused_defers() -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(srv.sockets[0].getsockname()[1])
    srv.close()
    await srv.wait_closed()
    ob = outbound(port)
    (res,) = await ob.deliver("b.test", "a@a.test", [Rcpt("bob@b.test")], b"S: x\r\n\r\nx\r\n")
    await ob.close()
    assert res.status == "deferred" and res.enhanced == "4.4.1"
    (gone,) = await ob.deliver("nowhere.test", "a@a.test", [Rcpt("x@nowhere.test")], b"S: x\r\n\r\nx\r\n")
    assert gone.status == "failed" and gone.enhanced == "5.1.2"


class TwoHosts(Lookup):
    """mx1 (preference 10) has only an address where nothing listens; mx2 (20) is on IPv6 loopback."""

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        return [(20, "mx2.b.test"), (10, "mx1.b.test")]

    async def addresses(self, host: str) -> list[str]:
        return ["127.0.0.9"] if host == "mx1.b.test" else ["::1"]


async def test_falls_back_to_the_next_mx_over_ipv6(mx_factory: Callable[..., Any]) -> None:
    mx, port = await mx_factory(["PIPELINING"], host="::1")
    ob = Outbound(DeliveryConfig(smtp_port=port, connect_timeout=5, command_timeout=5), "mx.a.test", TwoHosts())
    (res,) = await ob.deliver("b.test", "a@a.test", [Rcpt("bob@b.test")], b"S: x\r\n\r\nx\r\n")
    await ob.close()
    assert res.status == "delivered" and res.remote == "mx2.b.test"
    assert len(mx.payloads) == 1


class AnyDomain(Lookup):
    async def mx(self, domain: str) -> list[tuple[int, str]]:
        return []

    async def addresses(self, host: str) -> list[str]:
        return ["127.0.0.1"]


async def test_idn_domain_goes_as_a_label_without_smtputf8(mx_factory: Callable[..., Any]) -> None:
    mx, port = await mx_factory(["PIPELINING"])  # no SMTPUTF8
    ob = Outbound(DeliveryConfig(smtp_port=port, connect_timeout=5, command_timeout=5), "mx.a.test", AnyDomain())
    msg = b"Subject: idn\r\n\r\nx\r\n"
    (ok,) = await ob.deliver("bücher.test", "a@a.test", [Rcpt("bob@bücher.test")], msg)
    (utf8_local,) = await ob.deliver("bücher.test", "a@a.test", [Rcpt("jörg@bücher.test")], msg)
    await ob.close()
    assert ok.status == "delivered"
    assert b"RCPT TO:<bob@xn--bcher-kva.test>\r\n" in mx.lines
    assert utf8_local.status == "failed" and utf8_local.enhanced == "5.6.7"  # needs SMTPUTF8: bounced
    assert not any(b"j\xc3\xb6rg" in line for line in mx.lines)
