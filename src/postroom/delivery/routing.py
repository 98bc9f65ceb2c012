"""Where mail for a domain goes: MX lookup (RFC 5321 §5.1), implicit MX, null MX (RFC 7505).

Invariants:
- Hosts come in MX preference order (lowest first; equal preferences in random order, RFC 5321 §5.1); each
  host's IPv4 then IPv6 addresses. A domain without MX records is its own implicit MX (its A/AAAA).
- A null MX (a single MX ``0 .``, RFC 7505 §3) and a domain that does not exist (NXDOMAIN) are
  :class:`PermanentDeliveryError` at once; a DNS failure or timeout is a :class:`TransientDeliveryError`.
- Answers are cached for their TTL by the resolver (dnspython's cache), so a busy queue asks once per TTL.
- The DNS itself sits behind :class:`Lookup`, so tests give a fake one without any network.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from postroom.config import parse_hostport
from postroom.errors import PermanentDeliveryError, TransientDeliveryError

DNS_LIFETIME = 10.0  # seconds for one lookup across all nameservers and retries


@dataclass(frozen=True, slots=True)
class Hop:
    """One MX host (or the implicit MX) with the addresses to try, in order."""

    host: str  # the name certificates are checked against (no trailing dot)
    preference: int
    addresses: tuple[str, ...]


class NoSuchDomain(Exception):
    """NXDOMAIN: the name does not exist."""


class Lookup(abc.ABC):
    """The DNS questions routing asks. ``[]`` means no records of that type (NODATA)."""

    @abc.abstractmethod
    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """(preference, exchange without trailing dot; "" for the root) pairs. NoSuchDomain on NXDOMAIN."""

    @abc.abstractmethod
    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host``. NoSuchDomain on NXDOMAIN."""


class DnsLookup(Lookup):
    """:class:`Lookup` through dnspython's async stub resolver, with its TTL cache."""

    def __init__(self, nameservers: Sequence[str] = (), lifetime: float = DNS_LIFETIME) -> None:
        if nameservers:
            res = dns.asyncresolver.Resolver(configure=False)
            servers: list[str | dns.nameserver.Nameserver] = []
            for ns in nameservers:
                host, port = _nameserver(ns)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            res.nameservers = servers
        else:
            res = dns.asyncresolver.Resolver()
        res.cache = dns.resolver.Cache()
        res.lifetime = lifetime
        self.resolver = res

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        try:
            return await self.resolver.resolve(name + ".", rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain(name) from None
        except dns.resolver.NoAnswer:
            return None
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as exc:
            raise TransientDeliveryError(
                f"DNS lookup of {name} {rdtype} failed: {exc}", code=451, enhanced="4.4.3"
            ) from None

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        answer = await self._query(domain, "MX")
        if answer is None:
            return []
        out = []
        for rr in answer:
            out.append((int(rr.preference), rr.exchange.to_text(omit_final_dot=True).rstrip(".")))
        return out

    async def addresses(self, host: str) -> list[str]:
        out: list[str] = []
        missing = 0
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._query(host, rdtype)
            except NoSuchDomain:
                missing += 1
                continue
            if answer is not None:
                out.extend(rr.address for rr in answer)
        if missing == 2:
            raise NoSuchDomain(host)
        return out


def _nameserver(text: str) -> tuple[str, int]:
    """``"127.0.0.1"``, ``"127.0.0.1:5353"`` or ``"[::1]:5353"`` → (address, port)."""
    if text.startswith("[") or text.count(":") == 1:
        return parse_hostport(text)
    return text, 53


async def resolve_route(lookup: Lookup, domain: str) -> list[Hop]:
    """The hosts to try for ``domain``, best first. Raises Permanent/TransientDeliveryError."""
    domain = domain.lower().rstrip(".")
    try:
        records = await lookup.mx(domain)
    except NoSuchDomain:
        raise PermanentDeliveryError(f"domain {domain} does not exist", code=550, enhanced="5.1.2", remote="") from None
    if len(records) == 1 and records[0][1] in ("", "."):
        # RFC 7505 §3: "0 ." means the domain accepts no mail at all.
        raise PermanentDeliveryError(
            f"domain {domain} accepts no mail (null MX, RFC 7505)", code=556, enhanced="5.1.10"
        )
    if not records:
        try:
            addrs = await lookup.addresses(domain)
        except NoSuchDomain:
            raise PermanentDeliveryError(f"domain {domain} does not exist", code=550, enhanced="5.1.2") from None
        if not addrs:
            raise PermanentDeliveryError(f"domain {domain} has no MX and no address", code=550, enhanced="5.1.2")
        return [Hop(domain, 0, tuple(addrs))]
    records = [r for r in records if r[1] not in ("", ".")]
    records.sort(key=lambda r: (r[0], random.random()))  # spreads load, RFC 5321 §5.1
    hops: list[Hop] = []
    for pref, host in records:
        try:
            addrs = await lookup.addresses(host)
        except NoSuchDomain:
            continue
        if addrs:
            hops.append(Hop(host.lower(), pref, tuple(addrs)))
    if not hops:
        raise TransientDeliveryError(f"no MX host of {domain} has an address", code=451, enhanced="4.4.4")
    return hops
