"""Compute a message's stored structure. (Interim version: the IMAP work extends it.)

The returned dict always has:
- ``"v"``: STRUCTURE_VERSION; a store re-analyzes rows whose version is older.
- ``"header_size"``: octets of the header block including the blank line.
- ``"lines"``: number of lines of the whole message.
- ``"text"``: searchable text (decoded header values and text parts), for the full-text index.
"""

from __future__ import annotations

from typing import Any

STRUCTURE_VERSION = 1


def analyze(raw: bytes) -> dict[str, Any]:
    end = raw.find(b"\r\n\r\n")
    header_size = len(raw) if end < 0 else end + 4
    return {
        "v": STRUCTURE_VERSION,
        "header_size": header_size,
        "lines": raw.count(b"\n"),
        "text": raw.decode("utf-8", "replace"),
    }
