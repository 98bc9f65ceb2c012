"""DKIM signing of outgoing mail from local domains (RFC 6376, RFC 8463) and key generation.

Invariants:
- Keys live under ``data_dir/dkim/DOMAIN/``: ``SELECTOR-rsa.pem`` (PKCS#1 RSA 2048) and
  ``SELECTOR-ed25519.key`` (the base64 32-byte seed dkimpy reads), mode 0600. Each algorithm has its own
  selector (``SELECTOR-rsa`` / ``SELECTOR-ed25519``) because one TXT record holds one key.
- Signatures are relaxed/relaxed; rsa-sha256 always, ed25519-sha256 as well (RFC 8463 §1: sign with both
  while verifiers catch up). The signing domain is the From: header's domain when it is local (DMARC
  alignment), else the envelope sender's.
- Signing happens after any 8-bit to 7-bit conversion, on the exact bytes that go on the wire.
- A domain without keys is sent unsigned; a broken key file is logged and the mail is sent unsigned rather
  than stuck in the queue.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

log = logging.getLogger(__name__)

RSA_BITS = 2048  # RFC 8301 §3.2: at least 1024, 2048 recommended
CANONICALIZE = (b"relaxed", b"relaxed")
KEY_RECHECK = 60.0  # seconds before a domain's key files are read again


@dataclass(frozen=True, slots=True)
class DkimKey:
    algorithm: bytes  # b"rsa-sha256" | b"ed25519-sha256"
    selector: str
    private: bytes  # what dkimpy's sign() takes


def key_dir(data_dir: Path, domain: str) -> Path:
    return data_dir / "dkim" / domain.lower()


def keygen(data_dir: Path, domain: str, selector: str) -> list[tuple[str, str]]:
    """Create both keys for ``domain`` (existing ones are kept). Returns the (name, TXT value) to publish."""
    directory = key_dir(data_dir, domain)
    directory.mkdir(parents=True, exist_ok=True)
    rsa_path = directory / f"{selector}-rsa.pem"
    ed_path = directory / f"{selector}-ed25519.key"
    if not rsa_path.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        _write_secret(rsa_path, pem)
    if not ed_path.exists():
        ed = ed25519.Ed25519PrivateKey.generate()
        seed = ed.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        _write_secret(ed_path, base64.b64encode(seed) + b"\n")
    return dns_records(data_dir, domain, selector)


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def dns_records(data_dir: Path, domain: str, selector: str) -> list[tuple[str, str]]:
    """The TXT records (owner name, value) that publish the public keys of ``domain``."""
    out = []
    for key in load_keys(data_dir, domain, selector):
        if key.algorithm == b"rsa-sha256":
            priv = serialization.load_pem_private_key(key.private, password=None)
            assert isinstance(priv, rsa.RSAPrivateKey)
            der = priv.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            value = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
        else:
            seed = base64.b64decode(key.private)
            pub = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key()
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            value = "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
        out.append((f"{key.selector}._domainkey.{domain.lower()}", value))
    return out


def load_keys(data_dir: Path, domain: str, selector: str) -> list[DkimKey]:
    directory = key_dir(data_dir, domain)
    keys = []
    rsa_path = directory / f"{selector}-rsa.pem"
    ed_path = directory / f"{selector}-ed25519.key"
    if rsa_path.exists():
        keys.append(DkimKey(b"rsa-sha256", f"{selector}-rsa", rsa_path.read_bytes()))
    if ed_path.exists():
        keys.append(DkimKey(b"ed25519-sha256", f"{selector}-ed25519", ed_path.read_bytes().strip()))
    return keys


def zone_line(name: str, value: str, ttl: int = 3600) -> str:
    """A zone-file TXT line, the value split into the <= 255-octet strings DNS needs (RFC 1035 §3.3.14)."""
    parts = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
    return f"{name}. {ttl} IN TXT {parts}"


def from_domain(message: bytes) -> str:
    """The domain of the first From: address, lower-cased, or ""."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end]
    unfolded = head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    for line in unfolded.split(b"\r\n"):
        if line[:5].lower() == b"from:":
            _, addr = email.utils.parseaddr(line[5:].decode("utf-8", "replace"))
            return addr.rpartition("@")[2].lower()
    return ""


class DkimSigner:
    """Signs with the keys under ``data_dir`` of the configured local domains (keys cached after load)."""

    def __init__(self, data_dir: Path, selector: str, is_local: Callable[[str], bool]) -> None:
        """``is_local`` is asked at each message, so domains added while running are signed too."""
        self.data_dir = data_dir
        self.selector = selector
        self.is_local = is_local
        self._keys: dict[str, tuple[float, list[DkimKey]]] = {}

    def signing_domain(self, message: bytes, sender: str) -> str:
        for candidate in (from_domain(message), sender.rpartition("@")[2].lower()):
            if candidate and self.is_local(candidate):
                return candidate
        return ""

    def sign(self, message: bytes, sender: str) -> bytes:
        """``message`` with DKIM-Signature fields prepended, or unchanged when no local key applies."""
        domain = self.signing_domain(message, sender)
        if not domain:
            return message
        now = time.monotonic()
        cached = self._keys.get(domain)
        if cached is None or now - cached[0] > KEY_RECHECK:  # `dkim keygen` while serving is seen soon
            cached = self._keys[domain] = (now, load_keys(self.data_dir, domain, self.selector))
        keys = cached[1]
        headers = b""
        for key in keys:
            try:
                headers = (
                    dkim.sign(
                        message,
                        key.selector.encode(),
                        domain.encode(),
                        key.private,
                        canonicalize=CANONICALIZE,
                        signature_algorithm=key.algorithm,
                    )
                    + headers
                )
            except dkim.DKIMException as exc:
                log.error("DKIM signing for %s with %s failed: %s", domain, key.selector, exc)
        return headers + message
