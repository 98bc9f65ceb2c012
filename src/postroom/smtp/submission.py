"""What a Message Submission Agent adds to a message that lacks it (RFC 6409 §8).

Pure functions. Invariants: only a submitted message (port 587/465, authenticated) is completed, never one
relayed to us as an MX (RFC 6409 §8: these are the MSA's changes; an MTA leaves content alone); a field the
message has, in any case, is never added twice; added fields go at the end of the header block, before the
blank line, with CRLF line endings like the rest of the content.
"""

from __future__ import annotations

import os
import re
import time

from postroom.mime import split_header
from postroom.smtp.trace import rfc5322_date


def has_field(header: bytes, name: bytes) -> bool:
    """Whether the lower-cased header block ``header`` has a field ``name`` (lower case, without the colon),
    also in the obsolete form with blanks before the colon (RFC 5322 §4.5)."""
    return re.search(rb"(?:^|\n)" + re.escape(name) + rb"[ \t]*:", header) is not None


def complete(data: bytes, hostname: str, now: float | None = None) -> bytes:
    """``data`` with a ``Date:`` (RFC 6409 §8.2, MAY) and a ``Message-ID:`` (§8.3, SHOULD) if it lacks them.
    Many providers refuse mail without a Message-ID, and scripts, printers and scanners often send none."""
    end, _ = split_header(data)
    header = data[:end].lower()
    added = b""
    if not has_field(header, b"date"):
        added += f"Date: {rfc5322_date(time.time() if now is None else now)}\r\n".encode()
    if not has_field(header, b"message-id"):
        added += f"Message-ID: <{os.urandom(12).hex()}@{hostname}>\r\n".encode()
    if not added:
        return data
    if end == len(data) and data and not data.endswith(b"\r\n"):  # a header with no blank line or body
        return data + b"\r\n" + added
    return data[:end] + added + data[end:]
