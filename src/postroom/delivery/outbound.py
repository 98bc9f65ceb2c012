"""One delivery attempt of one message to the recipients of one domain, and the connections it reuses.

Invariants:
- Recipients are checked (no CR/LF/controls, ASCII unless SMTPUTF8) before any connection is opened; a bad
  one fails permanently (5.1.3) and never reaches the wire.
- Hosts are tried in route order; a connection failure, a 4xx/5xx greeting or EHLO, a failed TLS
  handshake, or a missing STARTTLS under ``require``/``verify`` moves on to the next address. Once a
  transaction ran, its replies are the attempt's outcome (a 4xx RCPT is deferred, not retried elsewhere).
- TLS policy: ``opportunistic`` uses STARTTLS when offered, without checking the certificate (RFC 7435);
  ``require`` insists on TLS; ``verify`` also checks the certificate against the MX host name.
- An 8-bit message goes to a peer without 8BITMIME only after conversion to 7-bit (RFC 6152 §3); when that
  is impossible (8-bit headers) or SMTPUTF8 is needed and missing, the recipients fail with 5.6.3/5.6.7 —
  never a silently corrupted message.
- DKIM signatures are computed over the exact bytes sent (after any conversion).
- Per destination at most ``destination_concurrency`` connections at once, ``max_connections`` overall;
  an idle connection is reused for the same address for ``connection_idle`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from postroom.delivery import wire
from postroom.delivery.client import Rcpt, SmtpClient
from postroom.delivery.dkimsign import DkimSigner
from postroom.delivery.limits import DeliveryConfig
from postroom.delivery.routing import Hop, Lookup, resolve_route
from postroom.delivery.smarthost import RateLimit, Smarthost
from postroom.delivery.wire import Reply
from postroom.errors import (
    DeliveryError,
    LocalProtocolError,
    PermanentDeliveryError,
    RemoteProtocolError,
    TransientDeliveryError,
)

log = logging.getLogger(__name__)

ROUTE_CACHE_SIZE = 10_000  # domains whose route is remembered at once

Status = Literal["delivered", "deferred", "failed"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    status: Status
    reply: str  # e.g. "250 2.0.0 Ok: queued as X" or our own explanation
    enhanced: str  # RFC 3463 status for the DSN
    remote: str = ""  # the host that answered
    peer_dsn: bool = False  # the peer announced DSN, so it now owns success notices (RFC 3461 §4.1)

    @classmethod
    def from_reply(cls, reply: Reply, remote: str, peer_dsn: bool) -> Outcome:
        status: Status = "delivered" if reply.positive else "failed" if reply.permanent else "deferred"
        enhanced = reply.enhanced or f"{str(reply.code)[0]}.0.0"
        return cls(status, str(reply), enhanced, remote, peer_dsn)

    @classmethod
    def from_error(cls, exc: DeliveryError) -> Outcome:
        status: Status = "failed" if isinstance(exc, PermanentDeliveryError) else "deferred"
        enhanced = exc.enhanced or ("5.0.0" if status == "failed" else "4.0.0")
        text = f"{exc.code} {enhanced} {exc}" if exc.code else str(exc)
        return cls(status, text, enhanced, exc.remote)


class _HopFailed(Exception):
    """This address could not take the message now; try the next one."""


def _tls_context(verify: bool, cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile or None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # RFC 7435 opportunistic security: encrypt, don't authenticate
    return ctx


class Outbound:
    """Sends queued messages; owns the connection cache and the concurrency limits."""

    def __init__(
        self,
        config: DeliveryConfig,
        hostname: str,
        lookup: Lookup,
        smarthost: Smarthost | None = None,
        signer: DkimSigner | None = None,
    ) -> None:
        self.cfg = config
        self.helo = config.helo_name or hostname
        self.lookup = lookup
        self.smarthost = smarthost
        self.signer = signer
        self._opportunistic = _tls_context(False, "")
        self._verified = _tls_context(True, config.tls_ca_file)
        self._idle: dict[tuple[str, int, str], list[tuple[SmtpClient, float]]] = {}
        self._dest: dict[str, asyncio.Semaphore] = {}
        self._all = asyncio.Semaphore(max(1, config.max_connections))
        self._lookups: dict[str, asyncio.Future[tuple[list[Hop], int]]] = {}
        self._routes: dict[str, tuple[float, tuple[list[Hop], int]]] = {}
        self._no_tls: dict[str, float] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._rate: RateLimit | None = None
        if smarthost is not None and smarthost.per_minute > 0:
            self._rate = RateLimit(
                smarthost.per_minute, time.monotonic()
            )  # addresses whose handshake failed (opportunistic: go plain)

    # -- connections ----------------------------------------------------------------------------
    def _dest_limit(self, key: str) -> asyncio.Semaphore:
        sem = self._dest.get(key)
        if sem is None:
            n = self.cfg.destination_concurrency
            if self.smarthost is not None and self.smarthost.concurrency:
                n = self.smarthost.concurrency
            sem = self._dest[key] = asyncio.Semaphore(max(1, n))
        return sem

    def _take_idle(self, key: tuple[str, int, str]) -> SmtpClient | None:
        now = time.monotonic()
        pool = self._idle.get(key)
        while pool:
            client, since = pool.pop()
            if client.usable and now - since < self.cfg.connection_idle:
                return client
            client.close()
        return None

    def _give_back(self, key: tuple[str, int, str], client: SmtpClient) -> None:
        limit = self.cfg.messages_per_connection
        if self.smarthost is not None and self.smarthost.messages_per_connection:
            limit = self.smarthost.messages_per_connection
        if client.usable and client.transactions < limit:
            self._idle.setdefault(key, []).append((client, time.monotonic()))
        else:
            self._quit_later(client)

    def has_idle(self) -> bool:
        return any(self._idle.values())

    def _quit_later(self, client: SmtpClient) -> None:
        """QUIT in the background (the task is kept referenced until it is done)."""
        task = asyncio.get_running_loop().create_task(client.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def reap(self) -> None:
        """Close connections idle longer than ``connection_idle`` (QUIT runs in the background)."""
        now = time.monotonic()
        for key in list(self._idle):
            keep = []
            for client, since in self._idle[key]:
                if client.usable and now - since < self.cfg.connection_idle:
                    keep.append((client, since))
                else:
                    self._quit_later(client)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    async def close(self) -> None:
        pools, self._idle = self._idle, {}
        await asyncio.gather(*(c.quit() for pool in pools.values() for c, _ in pool), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    async def _open(self, address: str, port: int, host: str) -> SmtpClient:
        """A ready session (greeted, EHLO'd, TLS per policy, authenticated for a smarthost)."""
        cfg = self.cfg
        sh = self.smarthost
        implicit = sh is not None and sh.security == "tls"
        verify = cfg.tls_policy == "verify" or (sh is not None and sh.verify)
        required = verify or cfg.tls_policy == "require" or (sh is not None and sh.security != "plain")
        ctx = self._verified if verify else self._opportunistic
        try:
            client = await SmtpClient.connect(
                address,
                port,
                connect_timeout=cfg.connect_timeout,
                command_timeout=cfg.command_timeout,
                tls=ctx if implicit else None,
                server_hostname=host if implicit else None,
            )
        except (OSError, TimeoutError, RemoteProtocolError, ssl.SSLError) as exc:
            raise _HopFailed(f"connect to {address}:{port} failed: {exc or type(exc).__name__}") from None
        try:
            assert client.greeting is not None
            if client.greeting.code != 220:
                raise _HopFailed(f"{host} greeted with {client.greeting}")
            reply = await client.ehlo(self.helo)
            if not reply.positive:
                raise _HopFailed(f"{host} refused EHLO/HELO: {reply}")
            skip_tls = not required and time.monotonic() < self._no_tls.get(address, 0.0)
            if not client.is_tls and client.ext.has("STARTTLS") and not skip_tls:
                try:
                    reply = await client.starttls(ctx, host if verify else None)
                except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
                    if not required:  # next attempt to this address goes without TLS, as Postfix does
                        self._no_tls[address] = time.monotonic() + 3600.0
                    raise _HopFailed(f"TLS handshake with {host} failed: {exc}") from None
                if reply.code != 220:
                    if required:
                        raise _HopFailed(f"{host} refused STARTTLS: {reply}")
                else:
                    reply = await client.ehlo(self.helo)
                    if not reply.positive:
                        raise _HopFailed(f"{host} refused EHLO after STARTTLS: {reply}")
            if required and not client.is_tls:
                raise _HopFailed(f"TLS is required but {host} does not offer STARTTLS")
            if sh is not None and sh.user:
                reply = await client.auth(sh.user, sh.password)
                if reply.code != 235:
                    raise _HopFailed(f"authentication at {host} failed: {reply}")
        except _HopFailed:
            await client.quit()
            raise
        except (ConnectionError, TimeoutError, RemoteProtocolError, LocalProtocolError) as exc:
            client.close()
            raise _HopFailed(f"session with {host} failed: {exc or type(exc).__name__}") from None
        except BaseException:
            client.close()
            raise
        return client

    # -- one attempt ----------------------------------------------------------------------------
    async def _route(self, domain: str) -> tuple[list[Hop], int]:
        """The hops for ``domain``; concurrent callers for one domain share a single lookup, and a
        resolved route is reused for ``route_cache`` seconds (errors are not cached)."""
        cached = self._routes.get(domain)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        pending = self._lookups.get(domain)
        if pending is None:
            pending = asyncio.ensure_future(self._resolve(domain))
            self._lookups[domain] = pending
            pending.add_done_callback(lambda _f: self._lookups.pop(domain, None))
        route = await asyncio.shield(pending)
        if self.cfg.route_cache > 0:
            if len(self._routes) >= ROUTE_CACHE_SIZE:
                self._routes.clear()
            self._routes[domain] = (now + self.cfg.route_cache, route)
        return route

    async def _resolve(self, domain: str) -> tuple[list[Hop], int]:
        sh = self.smarthost
        if sh is not None:
            addrs = await self.lookup.addresses(sh.host) if not _is_ip(sh.host) else [sh.host]
            return [Hop(sh.host, 0, tuple(addrs))], sh.port
        return await resolve_route(self.lookup, domain), self.cfg.smtp_port

    async def deliver(
        self,
        domain: str,
        sender: str,
        rcpts: Sequence[Rcpt],
        message: bytes,
        *,
        ret: str = "",
        envid: str = "",
    ) -> list[Outcome]:
        """Try to deliver ``message`` to ``rcpts`` (all in ``domain``). One Outcome per recipient, in order."""
        outcomes: list[Outcome | None] = [None] * len(rcpts)
        sender = wire.ascii_domain(sender)
        rcpts = [replace(r, address=wire.ascii_domain(r.address)) for r in rcpts]
        smtputf8 = not sender.isascii() or any(not r.address.isascii() for r in rcpts)
        smtputf8 = smtputf8 or wire.headers_eight_bit(message)
        try:
            wire.check_address(sender, smtputf8=True)
        except LocalProtocolError as exc:
            return [Outcome("failed", f"bad sender address: {exc}", "5.1.7")] * len(rcpts)
        live: list[int] = []
        for i, r in enumerate(rcpts):
            try:
                wire.check_address(r.address, smtputf8=True)
                live.append(i)
            except LocalProtocolError as exc:
                outcomes[i] = Outcome("failed", f"bad recipient address: {exc}", "5.1.3")
        if not live:
            return [o for o in outcomes if o is not None]
        try:
            hops, port = await self._route(domain)
        except DeliveryError as exc:
            return [o or Outcome.from_error(exc) for o in outcomes]
        last = "no address to try"
        key_dest = "smarthost" if self.smarthost is not None else domain
        if self._rate is not None:  # the provider's sending limit (e.g. Office 365: 30 a minute)
            wait = self._rate.reserve(time.monotonic())
            if wait > 0:
                await asyncio.sleep(wait)
        async with self._dest_limit(key_dest), self._all:
            for hop in hops:
                for address in hop.addresses:
                    key = (address, port, hop.host)
                    client = self._take_idle(key)
                    todo = [rcpts[i] for i in live]
                    try:
                        if client is None:
                            client = await self._open(address, port, hop.host)
                            done = await self._transaction(
                                client, hop.host, sender, todo, message, smtputf8, ret, envid
                            )
                        else:
                            try:
                                done = await self._transaction(
                                    client, hop.host, sender, todo, message, smtputf8, ret, envid
                                )
                            except _HopFailed:  # the cached connection had gone stale: one fresh try
                                client = await self._open(address, port, hop.host)
                                done = await self._transaction(
                                    client, hop.host, sender, todo, message, smtputf8, ret, envid
                                )
                    except _HopFailed as exc:
                        last = str(exc)
                        log.info("deliver to %s via %s: %s", domain, address, last)
                        client = None
                        continue
                    for i, outcome in zip(live, done, strict=True):
                        outcomes[i] = outcome
                    self._give_back(key, client)
                    return [o for o in outcomes if o is not None]
        failure = TransientDeliveryError(last, code=451, enhanced="4.4.1")
        return [o or Outcome.from_error(failure) for o in outcomes]

    async def _transaction(
        self,
        client: SmtpClient,
        host: str,
        sender: str,
        rcpts: list[Rcpt],
        message: bytes,
        smtputf8: bool,
        ret: str,
        envid: str,
    ) -> list[Outcome]:
        ext = client.ext
        if smtputf8 and not ext.has("SMTPUTF8"):
            return [Outcome("failed", f"{host} does not support SMTPUTF8 (RFC 6531 §3.2)", "5.6.7", host)] * len(rcpts)
        eight_bit = wire.is_eight_bit(message)
        if eight_bit and not ext.has("8BITMIME") and not smtputf8:
            converted = wire.to_seven_bit(message)
            if converted is None:
                return [Outcome("failed", f"{host} lacks 8BITMIME and conversion failed", "5.6.3", host)] * len(rcpts)
            message, eight_bit = converted, False
        if self.signer is not None:
            message = self.signer.sign(message, sender)
        if ext.size_limit and len(message) > ext.size_limit:
            text = f"message of {len(message)} octets exceeds {host}'s limit of {ext.size_limit} (RFC 1870)"
            return [Outcome("failed", text, "5.3.4", host)] * len(rcpts)
        try:
            result = await client.transaction(
                sender, rcpts, message, eight_bit=eight_bit, smtputf8=smtputf8, ret=ret, envid=envid
            )
        except (ConnectionError, TimeoutError, RemoteProtocolError) as exc:
            client.close()
            raise _HopFailed(f"transaction with {host} failed: {exc or type(exc).__name__}") from None
        peer_dsn = ext.has("DSN")
        return [Outcome.from_reply(result.outcome(i), host, peer_dsn) for i in range(len(rcpts))]


def _is_ip(host: str) -> bool:
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    return False
