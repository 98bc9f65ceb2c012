"""Composition: job config validation, strict templates, safe file names, the built message."""

from __future__ import annotations

import email
from email import policy
from pathlib import Path

import pytest

from postroom.burst.compose import RenderError, build, render, safe_filename, stable_message_id
from postroom.burst.jobconfig import load_job
from postroom.burst.plan import PageScan, make_plan
from postroom.burst.tags import find_tags
from postroom.errors import ConfigError

CONFIG = """
from = "Billing <billing@example.com>"
reply_to = "accounts@example.com"
attachments = ["terms.txt"]

[templates.INV]
subject = "Invoice {{ v1 }} for {{ v2 }}"
text = "Dear {{ v2 }},\\npages {{ pages }} of {{ source }} are in {{ filename }}.\\n"
html = "<p>Dear {{ v2 }}</p>"
filename = "Invoice {v1} / {v2}.pdf"
password = "{v3}"

[templates.default]
subject = "Statement"
text = "Hello {{ customer_name }}"
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    (tmp_path / "terms.txt").write_text("Terms and conditions\n")
    p = tmp_path / "burst.toml"
    p.write_text(CONFIG)
    return p


def plan_for(text: str, templates: set[str]) -> object:
    return make_plan([PageScan(1, tuple(find_tags(text)))], templates=templates)


def test_render_and_build(cfg: Path) -> None:
    job = load_job(cfg)
    plan = make_plan(
        [PageScan(1, tuple(find_tags("<pdfexplode>42,`Doe, J <x>`,pw1%INV#jo@x.example</pdfexplode>")))],
        templates=job.templates.keys(),
    )
    msg = plan.messages[0]
    r = render(job, msg, "report")
    assert r.subject == "Invoice 42 for Doe, J <x>"
    assert r.filename == "Invoice 42 _ Doe, J _x.pdf"
    assert r.password == "pw1"
    assert r.html == "<p>Dear Doe, J &lt;x&gt;</p>"  # HTML is escaped, text is not
    assert "pages 1 of report" in r.text
    mid = stable_message_id("job", msg.key, r.sender)
    assert mid == stable_message_id("job", msg.key, r.sender) and mid.endswith("@example.com>")
    raw = build(msg, r, b"%PDF-1.7 fake", job, message_id=mid)
    assert b"\r\n" in raw and b"\n\n" not in raw.replace(b"\r\n", b"")
    m = email.message_from_bytes(raw, policy=policy.default)
    assert m["To"] == "jo@x.example" and m["Message-ID"] == mid and m["Reply-To"] == "accounts@example.com"
    names = [p.get_filename() for p in m.iter_attachments()]
    assert names == ["Invoice 42 _ Doe, J _x.pdf", "terms.txt"]


def test_undefined_variable_names_template_and_page(cfg: Path) -> None:
    job = load_job(cfg)
    plan = make_plan(
        [PageScan(7, tuple(find_tags("<pdfexplode>x@y.example</pdfexplode>")))], templates=job.templates.keys()
    )
    with pytest.raises(RenderError, match=r"template 'default' .* page 7: 'customer_name' is undefined"):
        render(job, plan.messages[0], "report")


def test_unknown_field_in_filename_pattern(cfg: Path) -> None:
    job = load_job(cfg)
    plan = make_plan(
        [PageScan(1, tuple(find_tags("<pdfexplode>1%INV#x@y.example</pdfexplode>")))], templates=job.templates.keys()
    )
    with pytest.raises(RenderError, match=r"\{v2\}"):
        render(job, plan.messages[0], "report")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("colour = 'red'", "unknown key"),
        ("[templates.x]\ntext = 'a'", "subject is required"),
        ("[templates.x]\nsubject = '{{ a'\ntext = 'b'", "subject line 1"),
        ("group = 'sometimes'", "group must be"),
        ("attachments = ['missing.pdf']", "cannot be read"),
        ("[templates.x]\nsubject='s'\ntext='t'\nbody='b'", "unknown key"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_config_errors_name_the_file(tmp_path: Path, text: str, error: str) -> None:
    p = tmp_path / "burst.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=error) as info:
        load_job(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("../../etc/passwd", "etc_passwd.pdf"),
        ("a\x00b:c*?.pdf", "a_b_c.pdf"),
        ("CON.pdf", "_CON.pdf"),
        ("...", "document.pdf"),
        ("Rechnung Müller.PDF", "Rechnung Müller.pdf"),
        ("x" * 300, "x" * 116 + ".pdf"),
    ],
)
def test_safe_filename(name: str, safe: str) -> None:
    assert safe_filename(name) == safe


def test_mime_writer_round_trips_through_the_email_parser() -> None:
    from postroom.burst import mime
    from postroom.errors import LocalProtocolError

    subject = "Rechnung für Müller & Söhne — März " + "x" * 90
    text = "Grüße\n" + "long line " * 150 + "\n.leading dot\n"
    html = "<p>Grüße</p>"
    raw = mime.message(
        [
            ("From", mime.encode_mailbox('"Müller, Hans" <hans@example.com>')),
            ("To", mime.address_list(["a@example.com", "Bob Smith <b@example.com>", "jörg@bücher.example"])),
            ("Subject", mime.encode_text(subject)),
        ],
        text,
        html,
        [(b"%PDF-1.7\n" + bytes(range(256)) * 10, "application/pdf", "Rechnung März.pdf")],
    )
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    m = email.message_from_string(raw.decode("utf-8"), policy=policy.default)  # RFC 6532: UTF-8 headers
    assert m["Subject"] == subject
    assert m["From"].addresses[0].display_name == "Müller, Hans"
    assert [a.addr_spec for a in m["To"].addresses] == ["a@example.com", "b@example.com", "jörg@bücher.example"]
    plain, rich = m.get_body(("plain",)), m.get_body(("html",))
    assert plain is not None and plain.get_content().replace("\r\n", "\n") == text
    assert rich is not None and rich.get_content().strip() == html
    att = next(m.iter_attachments())
    assert att.get_filename() == "Rechnung März.pdf"
    assert att.get_payload(decode=True) == b"%PDF-1.7\n" + bytes(range(256)) * 10
    with pytest.raises(LocalProtocolError):
        mime.encode_text("hello\r\nBcc: victim@example.com")
