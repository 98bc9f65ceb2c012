"""Server TLS: the certificate (configured, or self-signed on first start) and the server SSLContext.

Invariants:
- Only TLS 1.2 and 1.3; TLS 1.2 suites are ECDHE key exchange with an AEAD cipher (AES-GCM, ChaCha20);
  no compression (CRIME), no renegotiation, the server's cipher order wins.
- With no ``[tls] cert``, a self-signed certificate is generated under ``data_dir/tls`` on first start
  (``key.pem`` mode 0600 inside a 0700 directory, written atomically) and reused afterwards; an expired
  self-signed one is replaced. A configured certificate is never generated or overwritten.
- A missing, unreadable or mismatched certificate or key gives a :class:`ConfigError` naming the file.
- Reload (SIGHUP) builds a new context; ``App.tls`` is replaced only when the new one loaded. Implicit-TLS
  listeners keep the context they were created with, so :func:`follow` installs a callback on it that
  switches each new handshake to the current ``App.tls`` (the callback runs for every ClientHello, with or
  without SNI).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from postroom.config import Config
from postroom.errors import ConfigError

#: TLS 1.2 suites: forward secrecy (ECDHE) with AEAD only. TLS 1.3 suites are all AEAD already.
#: (Mozilla's "intermediate" profile minus DHE, which needs parameters and is slow.)
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS"
SELF_SIGNED_DAYS = 3650  # validity of a generated certificate; it is self-signed, so CAs' limits don't apply
RSA_KEY_BITS = 2048  # NIST SP 800-57: 112-bit security through 2030; every mail client speaks RSA


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Where the server's certificate and key live, and whether Postroom generated them."""

    cert: Path
    key: Path
    self_signed: bool


def cert_files(cfg: Config) -> CertFiles:
    """The certificate and key paths of ``cfg`` (``[tls] key`` defaults to the cert file, a PEM bundle)."""
    if cfg.tls.key and not cfg.tls.cert:
        raise ConfigError(f"{cfg.source}: tls.key is set but tls.cert is not")
    if cfg.tls.cert:
        return CertFiles(Path(cfg.tls.cert), Path(cfg.tls.key or cfg.tls.cert), self_signed=False)
    return CertFiles(cfg.data_path / "tls" / "cert.pem", cfg.data_path / "tls" / "key.pem", self_signed=True)


def ensure_certificate(cfg: Config) -> CertFiles:
    """Return the certificate files, generating a self-signed pair first when none is configured."""
    files = cert_files(cfg)
    if files.self_signed and _needs_generation(files):
        generate_self_signed(files.cert, files.key, cfg.hostname)
    return files


def _needs_generation(files: CertFiles) -> bool:
    if not (files.cert.exists() and files.key.exists()):
        return True
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    except (OSError, ValueError):
        return False  # let loading report the broken file by name rather than silently replacing it
    return cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC)


def generate_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    """Write a new RSA key (0600) and a self-signed certificate for ``hostname``, localhost and loopback."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    dns = [x509.DNSName(h) for h in dict.fromkeys([hostname, "localhost"]) if h]
    ips = [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([*dns, *ips]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write to a temporary file created with ``mode`` in the same directory, fsync, rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_readable(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: TLS {what} file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read TLS {what} file: {exc.strerror}") from None


def server_context(files: CertFiles) -> ssl.SSLContext:
    """A server SSLContext with the house policy (see module invariants) and the certificate loaded."""
    cert_pem = _check_readable(files.cert, "certificate")
    _check_readable(files.key, "key")
    try:
        x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"{files.cert}: not a PEM certificate") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_SINGLE_ECDH_USE | ssl.OP_NO_TICKET
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{files.key}: TLS key does not load or does not match {files.cert} ({exc.reason or exc})"
        ) from None
    except OSError as exc:  # pragma: no cover - raced with a deletion after the check above
        raise ConfigError(f"{files.cert}: cannot load TLS certificate: {exc.strerror}") from None
    return ctx


def load(cfg: Config) -> tuple[ssl.SSLContext, CertFiles]:
    """Ensure the certificate exists, then build the server context for it."""
    files = ensure_certificate(cfg)
    return server_context(files), files


def fingerprint(cert_path: Path) -> str:
    """The SHA-256 fingerprint of the (first) certificate in ``cert_path``, as ``AB:CD:…``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{cert_path}: cannot read TLS certificate file: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{cert_path}: not a PEM certificate") from None
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def follow(ctx: ssl.SSLContext, current: Callable[[], ssl.SSLContext]) -> None:
    """Make handshakes on ``ctx`` use ``current()`` instead, so a reload reaches existing listeners."""

    def switch(sslobj: ssl.SSLObject | ssl.SSLSocket, _name: str | None, used: ssl.SSLContext) -> None:
        now = current()
        if now is not used:
            sslobj.context = now

    ctx.sni_callback = switch
