"""``postroom burst --check`` against real servers on 127.0.0.1: each typical mistake gets its explanation."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from burst_support import Sink, customers, make_report, write_job

from conftest import server_tls_context
from postroom.burst.cli import main


def check(capsys: pytest.CaptureFixture[str], url: str, *extra: str) -> tuple[int, str]:
    code = main(["unused.pdf", "--check", "--transport", url, "--connect-timeout", "2", *extra])
    return code, capsys.readouterr().out


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTROOM_SMTP_PASSWORD", "right")


def test_check_ok_with_starttls_and_auth(
    tls_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str], password: None
) -> None:
    cert, key = tls_files
    s = Sink(tls=server_tls_context(cert, key), require_auth=True, users={"me": "right"})
    try:
        code, out = check(capsys, f"smtp+starttls://me@127.0.0.1:{s.port}?cafile={cert}")
        assert code == 0 and out.startswith("OK:") and "authenticated as me" in out
        assert s.messages() == []
    finally:
        s.close()


def test_implicit_tls_on_a_starttls_port(tls_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = tls_files
    s = Sink(tls=server_tls_context(cert, key))
    try:
        code, out = check(capsys, f"smtps://127.0.0.1:{s.port}?cafile={cert}")
        assert code == 1 and "this port uses StartTLS" in out and "587" in out
    finally:
        s.close()


def test_starttls_on_an_implicit_tls_port(tls_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = tls_files
    s = Sink(tls=server_tls_context(cert, key), implicit_tls=True)
    try:
        code, out = check(capsys, f"smtp+starttls://127.0.0.1:{s.port}?cafile={cert}")
        assert code == 1 and "expects SSL from the first byte" in out and "smtps://" in out
    finally:
        s.close()


def test_no_starttls_offered(capsys: pytest.CaptureFixture[str]) -> None:
    s = Sink()
    try:
        code, out = check(capsys, f"smtp+starttls://127.0.0.1:{s.port}")
        assert code == 1 and "does not offer STARTTLS" in out
    finally:
        s.close()


def test_untrusted_certificate(tls_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = tls_files
    s = Sink(tls=server_tls_context(cert, key))
    try:
        code, out = check(capsys, f"smtp+starttls://127.0.0.1:{s.port}")
        assert code == 1 and "certificate was not accepted" in out and "cafile" in out
        code, out = check(capsys, f"smtp+starttls://127.0.0.1:{s.port}?verify=no")
        assert code == 0
    finally:
        s.close()


def test_auth_refused(
    tls_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tls_files
    monkeypatch.setenv("POSTROOM_SMTP_PASSWORD", "wrong")
    s = Sink(tls=server_tls_context(cert, key), require_auth=True, users={"me": "right"})
    try:
        code, out = check(capsys, f"smtp+starttls://me@127.0.0.1:{s.port}?cafile={cert}")
        assert code == 1 and "refused the user name or password" in out and "535" in out
    finally:
        s.close()


def test_connection_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out = check(capsys, f"smtp+starttls://127.0.0.1:{port}")
    assert code == 1 and "connection refused" in out and "587" in out


def test_failed_check_before_sending_sends_nothing(
    tmp_path: Path, tls_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = tls_files
    s = Sink(tls=server_tls_context(cert, key))
    try:
        pdf = make_report(tmp_path / "r.pdf", customers(2))
        url = f"smtps://127.0.0.1:{s.port}?cafile={cert}"
        code = main(
            [
                str(pdf),
                "--config",
                str(write_job(tmp_path)),
                "--transport",
                url,
                "--out",
                str(tmp_path / "o"),
                "--plain",
                "--workers",
                "1",
                "--connect-timeout",
                "2",
            ]
        )
        out = capsys.readouterr().out
        assert code == 1 and "connection check failed" in out and "nothing was sent" in out
        assert s.messages() == []
    finally:
        s.close()
