"""Server TLS: self-signed generation and reuse, errors naming the file, the policy, and reload."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import ssl
import stat
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from postroom.app import App, ListenerSpec
from postroom.auth.service import Authenticator
from postroom.config import Config, TlsConfig
from postroom.errors import ConfigError
from postroom.net import tls
from postroom.net.connection import Connection
from postroom.net.server import Listener
from postroom.store.api import Store


def cfg_for(tmp_path: Path, **tls_values: str) -> Config:
    return Config(hostname="mx.example.test", data_dir=str(tmp_path / "data"), tls=TlsConfig(**tls_values))


def client_ctx(**kw: object) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def test_self_signed_generated_once_with_private_key_0600(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    files = tls.ensure_certificate(cfg)
    assert files.self_signed
    assert files.cert == tmp_path / "data" / "tls" / "cert.pem"
    assert stat.S_IMODE(os.stat(files.key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(files.cert.parent).st_mode) == 0o700
    first = tls.fingerprint(files.cert)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mx.example.test" in names.get_values_for_type(x509.DNSName)
    # Second start: the same certificate is reused, not regenerated.
    again = tls.ensure_certificate(cfg)
    assert tls.fingerprint(again.cert) == first
    assert first == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert len(first.split(":")) == 32


def test_expired_self_signed_is_replaced(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    files = tls.cert_files(cfg)
    tls.generate_self_signed(files.cert, files.key, "old.example.test")
    old = tls.fingerprint(files.cert)
    # Make an expired one by hand, with the same key file layout.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "old")])
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    expired = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(past - datetime.timedelta(days=1))
        .not_valid_after(past)
        .sign(key, hashes.SHA256())
    )
    files.cert.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    renewed = tls.ensure_certificate(cfg)
    assert tls.fingerprint(renewed.cert) not in (old, expired.fingerprint(hashes.SHA256()).hex(":").upper())


def test_configured_certificate_is_never_generated(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "cert.pem"
    cfg = cfg_for(tmp_path, cert=str(missing), key=str(tmp_path / "nope" / "key.pem"))
    with pytest.raises(ConfigError) as err:
        tls.load(cfg)
    assert str(missing) in str(err.value)
    assert "not found" in str(err.value)
    assert not missing.exists()


def test_missing_key_names_the_key_file(tmp_path: Path) -> None:
    files = tls.cert_files(cfg_for(tmp_path))
    tls.generate_self_signed(files.cert, files.key, "x")
    key = tmp_path / "other.key"
    with pytest.raises(ConfigError, match=re.escape(str(key))):
        tls.load(cfg_for(tmp_path, cert=str(files.cert), key=str(key)))


def test_key_that_does_not_match_is_an_error(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    tls.generate_self_signed(a / "cert.pem", a / "key.pem", "a")
    tls.generate_self_signed(b / "cert.pem", b / "key.pem", "b")
    with pytest.raises(ConfigError, match="does not match"):
        tls.load(cfg_for(tmp_path, cert=str(a / "cert.pem"), key=str(b / "key.pem")))


def test_garbage_certificate_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        tls.load(cfg_for(tmp_path, cert=str(bad), key=str(bad)))


def test_key_without_cert_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls\.key"):
        tls.cert_files(cfg_for(tmp_path, key="/x.key"))


def test_pem_bundle_serves_as_cert_and_key(tmp_path: Path) -> None:
    files = tls.cert_files(cfg_for(tmp_path))
    tls.generate_self_signed(files.cert, files.key, "x")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(files.cert.read_bytes() + files.key.read_bytes())
    ctx, got = tls.load(cfg_for(tmp_path, cert=str(bundle)))
    assert got.key == bundle and not got.self_signed
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_policy_options(tmp_path: Path) -> None:
    ctx, _ = tls.load(cfg_for(tmp_path))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12, "some TLS 1.2 suites must remain"
    for c in tls12:
        assert c["kea"] == "kx-ecdhe", c["name"]
        assert c["aead"], c["name"]


# -- real handshakes through a Listener -----------------------------------------------------------------
async def _hello(conn: Connection, app: App, spec: ListenerSpec) -> None:
    conn.write(b"hello\r\n")
    await conn.drain()


def make_app(cfg: Config, ctx: ssl.SSLContext) -> App:
    store = cast(Store, None)  # the listener never touches the store
    return App(cfg, store, Authenticator(store, cfg.auth), ctx)


async def handshake(port: int, client: ssl.SSLContext) -> tuple[str, str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
    try:
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True)
        fp = x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex(":").upper()
        line = await reader.readline()
        assert line == b"hello\r\n"
        return obj.version(), fp, line
    finally:
        writer.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_handshake_policy_and_reload_reaches_existing_listener(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    ctx, files = tls.load(cfg)
    app = make_app(cfg, ctx)
    listener = Listener(ListenerSpec("imaps", "127.0.0.1", 0, "implicit"), app, _hello)
    await listener.start()
    try:
        version, fp, _ = await handshake(listener.port, client_ctx())
        assert version == "TLSv1.3"
        assert fp == tls.fingerprint(files.cert)
        # TLS 1.2 with an ECDHE AEAD suite works …
        v12 = client_ctx(maximum_version=ssl.TLSVersion.TLSv1_2)
        v12.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
        assert (await handshake(listener.port, v12))[0] == "TLSv1.2"
        # … RSA key exchange (no forward secrecy) and CBC suites do not.
        for suite in ("AES128-GCM-SHA256", "ECDHE-RSA-AES128-SHA"):
            weak = client_ctx(maximum_version=ssl.TLSVersion.TLSv1_2)
            weak.set_ciphers(suite)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await handshake(listener.port, weak)
        # TLS 1.1 is refused.
        old = client_ctx(minimum_version=ssl.TLSVersion.TLSv1, maximum_version=ssl.TLSVersion.TLSv1_1)
        old.set_ciphers("ALL:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await handshake(listener.port, old)

        # Reload: a new certificate on disk, a new context in the App; the listener follows.
        tls.generate_self_signed(files.cert, files.key, "new.example.test")
        app.tls = tls.server_context(files)
        _, fp2, _ = await handshake(listener.port, client_ctx())
        assert fp2 == tls.fingerprint(files.cert) != fp
    finally:
        await listener.close()
