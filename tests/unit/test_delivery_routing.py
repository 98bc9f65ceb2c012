"""MX routing with a fake resolver: preference order, implicit MX, null MX, NXDOMAIN, IPv6."""

from __future__ import annotations

import pytest

from postroom.delivery.routing import Lookup, NoSuchDomain, resolve_route
from postroom.errors import PermanentDeliveryError, TransientDeliveryError


class FakeLookup(Lookup):
    def __init__(self, mx: dict[str, list[tuple[int, str]]], addrs: dict[str, list[str]]) -> None:
        self._mx = mx
        self._addrs = addrs
        self.asked: list[str] = []

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        self.asked.append(f"MX {domain}")
        if domain not in self._mx and domain not in self._addrs:
            raise NoSuchDomain(domain)
        return self._mx.get(domain, [])

    async def addresses(self, host: str) -> list[str]:
        self.asked.append(f"ADDR {host}")
        if host not in self._addrs:
            raise NoSuchDomain(host)
        return self._addrs[host]


async def test_preference_order_and_both_families() -> None:
    lookup = FakeLookup(
        {"b.test": [(20, "mx2.b.test"), (10, "mx1.b.test"), (30, "gone.b.test")]},
        {"mx1.b.test": ["127.0.0.3", "::1"], "mx2.b.test": ["127.0.0.4"]},
    )
    hops = await resolve_route(lookup, "B.test.")
    assert [(h.host, h.preference, h.addresses) for h in hops] == [
        ("mx1.b.test", 10, ("127.0.0.3", "::1")),
        ("mx2.b.test", 20, ("127.0.0.4",)),
    ]


async def test_implicit_mx_when_no_mx_records() -> None:
    lookup = FakeLookup({}, {"c.test": ["::1"]})
    hops = await resolve_route(lookup, "c.test")
    assert [(h.host, h.addresses) for h in hops] == [("c.test", ("::1",))]


async def test_null_mx_is_permanent_at_once() -> None:
    lookup = FakeLookup({"nomail.test": [(0, "")]}, {"nomail.test": ["127.0.0.9"]})
    with pytest.raises(PermanentDeliveryError) as info:
        await resolve_route(lookup, "nomail.test")
    assert info.value.enhanced == "5.1.10" and info.value.code == 556
    assert lookup.asked == ["MX nomail.test"]  # no address lookup, no connection


async def test_nxdomain_is_permanent() -> None:
    with pytest.raises(PermanentDeliveryError) as info:
        await resolve_route(FakeLookup({}, {}), "nowhere.test")
    assert info.value.enhanced == "5.1.2"


async def test_mx_hosts_without_address_is_transient() -> None:
    with pytest.raises(TransientDeliveryError):
        await resolve_route(FakeLookup({"b.test": [(10, "mx.b.test")]}, {}), "b.test")


async def test_equal_preferences_all_present() -> None:
    lookup = FakeLookup(
        {"b.test": [(10, f"mx{i}.b.test") for i in range(5)]},
        {f"mx{i}.b.test": [f"127.0.0.{i + 10}"] for i in range(5)},
    )
    hops = await resolve_route(lookup, "b.test")
    assert sorted(h.host for h in hops) == [f"mx{i}.b.test" for i in range(5)]
