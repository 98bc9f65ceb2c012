"""Handing messages to the user's own mail program instead of sending them (the "MAPI" hand-off).

- ``--to-eml DIR``: one ``.eml`` file per message (RFC 5322 with CRLF), which Outlook, Thunderbird and Apple
  Mail open as a ready message.
- ``--to-drafts imap://user@host/Drafts`` or ``imaps://…``: each message is saved with IMAP APPEND and the
  ``\\Draft`` flag (RFC 9051 §6.3.12) into that folder, for review and sending from the user's mail program.

Invariants:
- File names are unique and stable per message (sequence number + safe recipient), so a re-run overwrites
  instead of piling up copies; files are written to a temporary name and renamed (never half a file).
- ``imap://`` requires STARTTLS before LOGIN unless the host is a loopback address; ``imaps://`` is TLS
  from the first byte. Certificates are verified unless ``verify=no``.
"""

from __future__ import annotations

import contextlib
import imaplib
import ipaddress
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from postroom.errors import ConfigError, PostroomError

IMAP_TIMEOUT = 60.0  # seconds per IMAP operation


class HandoffError(PostroomError):
    """The drafts folder could not be reached or refused a message."""


def eml_name(seq: int, recipient: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9@._-]+", "_", recipient)[:80] or "message"
    return f"{seq:05d}-{safe}.eml"


def write_eml(directory: Path, seq: int, recipient: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / eml_name(seq, recipient)
    tmp = path.with_suffix(".eml.tmp")
    with tmp.open("wb") as f:
        f.write(data)
    tmp.replace(path)
    return path


@dataclass(frozen=True, slots=True)
class DraftsTarget:
    tls: bool
    host: str
    port: int
    user: str
    folder: str
    cafile: str | None = None
    verify: bool = True

    @property
    def is_loopback(self) -> bool:
        try:
            return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_drafts_url(url: str) -> DraftsTarget:
    parts = urlsplit(url)
    if parts.scheme not in ("imap", "imaps"):
        raise ConfigError(f"drafts URL {url!r}: scheme must be imap or imaps")
    if parts.password is not None:
        raise ConfigError("drafts URL must not contain a password; use POSTROOM_IMAP_PASSWORD or the prompt")
    if not parts.hostname or not parts.username:
        raise ConfigError(f"drafts URL {url!r}: needs user@host")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    tls = parts.scheme == "imaps"
    try:
        port = parts.port or (993 if tls else 143)
    except ValueError:
        raise ConfigError(f"drafts URL {url!r}: invalid port") from None
    return DraftsTarget(
        tls=tls,
        host=parts.hostname,
        port=port,
        user=unquote(parts.username),
        folder=unquote(parts.path.lstrip("/")) or "Drafts",
        cafile=query.get("cafile"),
        verify=query.get("verify", "yes").lower() not in ("no", "0", "false"),
    )


class DraftsWriter:
    """One IMAP session that appends drafts; blocking (run it in a thread)."""

    def __init__(self, target: DraftsTarget, password: str) -> None:
        self.target = target
        ctx = ssl.create_default_context(cafile=target.cafile)
        if not target.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            if target.tls:
                self.imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                    target.host, target.port, ssl_context=ctx, timeout=IMAP_TIMEOUT
                )
            else:
                self.imap = imaplib.IMAP4(target.host, target.port, timeout=IMAP_TIMEOUT)
                if "STARTTLS" in self.imap.capabilities:
                    self.imap.starttls(ssl_context=ctx)
                elif not target.is_loopback:
                    raise HandoffError(f"{target.host}:{target.port} offers no STARTTLS; use imaps://…:993")
            self.imap.login(target.user, password)
        except (OSError, imaplib.IMAP4.error) as exc:
            raise HandoffError(f"IMAP {target.host}:{target.port}: {exc}") from None

    def append(self, data: bytes) -> str:
        """APPEND one message as a draft; returns the server's reply text."""
        try:
            typ, resp = self.imap.append(
                _quote_mailbox(self.target.folder), r"(\Draft)", imaplib.Time2Internaldate(time.time()), data
            )
        except (OSError, imaplib.IMAP4.error) as exc:
            raise HandoffError(f"IMAP APPEND to {self.target.folder!r}: {exc}") from None
        text = b" ".join(r for r in resp if isinstance(r, bytes)).decode("utf-8", "replace")
        if typ != "OK":
            raise HandoffError(f"IMAP APPEND to {self.target.folder!r} refused: {text}")
        return f"OK {text}".strip()

    def close(self) -> None:
        with contextlib.suppress(OSError, imaplib.IMAP4.error):
            self.imap.logout()


def _quote_mailbox(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
