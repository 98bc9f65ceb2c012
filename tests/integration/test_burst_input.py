"""Bad input: each case is a clear error naming the file and page or template, a non-zero exit, nothing sent."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pikepdf
import pytest
from burst_support import Sink, customers, make_report, write_job

from postroom.burst.cli import main


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in args] + ["--plain", "--workers", "1"])
    return code, capsys.readouterr().out


def test_encrypted_pdf_without_password(
    tmp_path: Path, sink: Sink, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = make_report(tmp_path / "plain.pdf", customers(2))
    enc = tmp_path / "locked.pdf"
    with pikepdf.open(plain) as pdf:
        pdf.save(enc, encryption=pikepdf.Encryption(user="open sesame", owner="owner", R=6))
    url = f"smtp://127.0.0.1:{sink.port}"
    code, out = run(capsys, enc, "--config", write_job(tmp_path), "--transport", url, "--out", tmp_path / "o")
    assert code == 2 and "locked.pdf" in out and "encrypted" in out and "POSTROOM_PDF_PASSWORD" in out
    monkeypatch.setenv("POSTROOM_PDF_PASSWORD", "wrong")
    code, out = run(capsys, enc, "--config", write_job(tmp_path), "--transport", url, "--out", tmp_path / "o")
    assert code == 2 and "password is wrong" in out
    assert sink.messages() == []
    # With the right password the report bursts normally.
    monkeypatch.setenv("POSTROOM_PDF_PASSWORD", "open sesame")
    code, out = run(capsys, enc, "--config", write_job(tmp_path), "--transport", url, "--out", tmp_path / "o")
    assert code == 0, out
    assert len(sink.messages()) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_pdf(tmp_path: Path, sink: Sink, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    good = make_report(tmp_path / "good.pdf", customers(3)).read_bytes()
    bad = tmp_path / "broken.pdf"
    bad.write_bytes({"garbage": b"%PDF-1.4\n" + bytes(range(256)) * 20, "truncated": good[:300], "empty": b""}[damage])
    url = f"smtp://127.0.0.1:{sink.port}"
    code, out = run(capsys, bad, "--config", write_job(tmp_path), "--transport", url, "--out", tmp_path / "o")
    assert code == 2 and "broken.pdf" in out, out
    assert sink.messages() == []


def test_pdf_without_tags(tmp_path: Path, sink: Sink, capsys: pytest.CaptureFixture[str]) -> None:
    from reportlab.pdfgen import canvas

    path = tmp_path / "untagged.pdf"
    c = canvas.Canvas(str(path))
    for i in range(3):
        c.drawString(72, 700, f"Just a page {i}")
        c.showPage()
    c.save()
    url = f"smtp://127.0.0.1:{sink.port}"
    code, out = run(capsys, path, "--config", write_job(tmp_path), "--transport", url, "--out", tmp_path / "o")
    assert code == 1 and "untagged.pdf: error: document: no tags found" in out
    assert sink.messages() == []


def test_template_with_undefined_variable(tmp_path: Path, sink: Sink, capsys: pytest.CaptureFixture[str]) -> None:
    people = customers(3)
    pdf = make_report(tmp_path / "r.pdf", people)
    job = tmp_path / "bad.toml"
    job.write_text(
        'from = "b@example.test"\n[templates.INV]\nsubject = "Hi {{ v1 }}"\ntext = "Total {{ total_amount }}"\n'
    )
    url = f"smtp://127.0.0.1:{sink.port}"
    code, out = run(capsys, pdf, "--config", job, "--transport", url, "--out", tmp_path / "o")
    assert code == 1
    assert "r.pdf: error: page 1: template 'INV'" in out and "'total_amount' is undefined" in out
    assert str(job) in out
    assert sink.messages() == []


def test_template_syntax_error_names_the_template(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pdf = make_report(tmp_path / "r.pdf", customers(1))
    job = tmp_path / "bad.toml"
    job.write_text('[templates.INV]\nsubject = "ok"\ntext = "{% if %}"\n')
    code, out = run(capsys, pdf, "--config", job, "--dry-run", "--out", tmp_path / "o")
    assert code == 2 and "[templates.INV]: text line 1" in out


def test_missing_file_and_bad_transport(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, tmp_path / "nope.pdf", "--dry-run")
    assert code == 2 and "nope.pdf: no such file" in out
    pdf = make_report(tmp_path / "r.pdf", customers(1))
    code, out = run(capsys, pdf, "--transport", "smtp://u:pw@127.0.0.1:1")
    assert code == 2 and "must not contain a password" in out
    code, out = run(capsys, pdf, "--transport", "http://127.0.0.1:1")
    assert code == 2 and "scheme must be" in out


def test_split_output_is_small_and_shares_fonts(tmp_path: Path) -> None:
    """A 3-page split holds each font once, and is much smaller than the report."""
    from postroom.burst.pdf import split

    pdf = make_report(tmp_path / "r.pdf", customers(30))
    with pikepdf.open(pdf) as src:
        data = split(src, [1, 2, 3])
    out = pikepdf.open(io.BytesIO(data))
    fonts = {font.objgen for page in out.pages for font in page.Resources.Font.values()}
    assert len(out.pages) == 3 and len(fonts) == 2  # Helvetica and Helvetica-Bold, shared by all pages
    assert len(data) < pdf.stat().st_size / 5


def test_preset_recipient_limit_is_a_preflight_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reportlab.pdfgen import canvas

    cc = ", ".join(f"p{i}@example.test" for i in range(100))
    tag = f"[[postroom to=boss@example.test; cc={cc}]]"
    path = tmp_path / "wide.pdf"
    c = canvas.Canvas(str(path))
    c.setFont("Helvetica", 4)
    for k in range(0, len(tag), 300):  # wrapped over several lines, as a report writer would
        c.drawString(20, 800 - 6 * (k // 300), tag[k : k + 300])
    c.showPage()
    c.save()
    code, out = run(capsys, path, "--dry-run", "--preset", "gmail", "--out", tmp_path / "o")
    assert code == 1 and "page 1: 101 recipients (to+cc+bcc); the provider allows 100" in out
    code, out = run(capsys, path, "--dry-run", "--out", tmp_path / "o")
    assert code == 0
