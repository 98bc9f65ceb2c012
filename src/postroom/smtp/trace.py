"""The trace header fields added at delivery: ``Return-Path:`` and ``Received:`` (RFC 5321 §4.4).

Pure functions. Invariants: every value that came from the peer (HELO name, addresses) is sanitised so the
header cannot be broken or extended (no CR, LF, parentheses or backslashes from the peer); lines are folded
below 998 octets; the date is RFC 5322 §3.3 with a numeric zone.
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate

from postroom.wire.address import Address, format_path

_UNSAFE = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e\u0080-\U0010ffff]")
_date_cache: tuple[int, str] = (-1, "")


def _clean(text: str, limit: int = 255) -> str:
    return _UNSAFE.sub("?", text)[:limit] or "unknown"


def rfc5322_date(now: float) -> str:
    """``now`` as an RFC 5322 §3.3 date in UTC with a numeric zone (``+0000``), cached per second."""
    global _date_cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, formatdate(second, localtime=False).replace("-0000", "+0000"))
    return _date_cache[1]


def return_path(sender: Address | None) -> bytes:
    """``Return-Path: <sender>`` (``<>`` for bounces), added at final delivery (RFC 5321 §4.4)."""
    return f"Return-Path: {format_path(sender)}\r\n".encode()


def received(
    *,
    helo: str,
    peer_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    tls_info: str = "",
    recipient: Address | None = None,
    now: float | None = None,
) -> bytes:
    """A ``Received:`` field: from HELO ([ip]), the TLS version and cipher, by us, with, id, for; date."""
    ip = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    lines = [f"Received: from {_clean(helo)} ([{_clean(ip, 64)}])"]
    if tls_info:
        version, _, cipher = tls_info.partition(" ")
        tls = f"(using {_clean(version, 32)} with cipher {_clean(cipher, 96)})" if cipher else f"({tls_info})"
        lines.append(f"\t{tls}")
    lines.append(f"\tby {hostname} (Postroom) with {protocol} id {queue_id}")
    date = rfc5322_date(time.time() if now is None else now)
    if recipient is not None:
        lines.append(f"\tfor <{_clean(str(recipient), 300)}>; {date}")
    else:
        lines.append(f"\t; {date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
