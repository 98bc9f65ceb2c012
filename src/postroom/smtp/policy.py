"""Who may send what where: the MX and submission relay rules, as pure functions.

Invariants:
- The decision is made on the address mail is actually routed to (after :mod:`postroom.wire.address` has
  dropped any source route); ``%`` and ``!`` are never interpreted; a quoted local part stays one local part.
- MX (port 25/2525) accepts only local domains: anything else is relaying and refused with 554 5.7.1.
  Address literals (``[192.0.2.1]``) are never local.
- Submission (587/465) needs an authenticated user; local recipients are delivered, remote ones queued.
- ``<Postmaster>`` without a domain (RFC 5321 §4.5.1) means postmaster at the first local domain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from postroom.wire import replies
from postroom.wire.address import Address
from postroom.wire.replies import Reply

Route = Literal["local", "remote"]


def route_recipient(
    address: Address,
    *,
    submission: bool,
    authenticated: bool,
    is_local_domain: Callable[[str], bool],
) -> Route | Reply:
    """``"local"``, ``"remote"`` or the refusal to send for ``RCPT TO:<address>``."""
    if address.domain == "" and address.local == "postmaster":
        return "local"
    local = not address.is_literal and (is_local_domain(address.domain) or is_local_domain(address.domain_ascii))
    if local:
        return "local"
    if submission and authenticated:
        return "remote"
    return replies.RELAY_DENIED


def postmaster_address(address: Address, domains: tuple[str, ...]) -> str | None:
    """The lookup key for ``address``, mapping a bare ``postmaster`` to the first local domain."""
    if address.domain == "":
        return f"postmaster@{domains[0]}" if domains else None
    return address.lookup_key
