"""The whole path: a 300-page report for 100 customers burst through Postroom's own submission port.

STARTTLS + AUTH on the server's 587 listener (on 127.0.0.1:0), the burst killed with SIGKILL mid-way and run
again; then every customer's INBOX (read through the store API, and every tenth over IMAP) holds exactly
one message whose PDF has exactly their pages, with subject and body from the template.
"""

from __future__ import annotations

import imaplib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from burst_support import Customer, burst_command, expected_titles, make_report, parse, pdf_page_titles, write_job

from conftest import RunningServer
from postroom.auth.passwords import hash_password
from postroom.burst.cli import main

DEADLINE = 120.0  # seconds for the killed run to get half-way


def people_300_pages() -> list[Customer]:
    """100 customers, 1-5 pages each (300 pages), both syntaxes, white 1-pt and broken tags."""
    return [
        Customer(
            n=i,
            address=f"cust{i}@example.test",
            pages=1 + i % 5,
            syntax="native" if i % 2 else "pdfexplode",
            style=("normal", "white", "broken")[i % 3],
            amount=f"{i * 2.25:.2f}",
            tag_every_page=i % 4 == 0,
        )
        for i in range(100)
    ]


def sent_count(ledger: Path) -> int:
    if not ledger.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT count(*) FROM message WHERE status='sent'").fetchone()[0])
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except OSError:
            continue
        out.extend(kids)
        todo.extend(kids)
    return out


@pytest.mark.slow
def test_300_pages_100_customers_through_postroom_submission_with_kill_and_rerun(
    tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    srv = server_factory(services=["submission", "imap"])
    if "submission" not in srv.ports:
        pytest.skip("postroom.smtp.adapter is not available")
    people = people_300_pages()
    assert sum(c.pages for c in people) == 300
    srv.add_user("billing@example.test", "burst pw")
    mailbox_hash = hash_password("never used")  # one hash for all: argon2 is slow on purpose
    for c in people:
        srv.call(srv.app.store.create_account(c.address, mailbox_hash))
    pdf = make_report(tmp_path / "invoices.pdf", people)
    job = write_job(tmp_path, sender="billing@example.test")
    out = tmp_path / "out"
    url = (
        f"smtp+starttls://billing%40example.test@127.0.0.1:{srv.ports['submission']}?cafile={srv.cafile}&concurrency=4"
    )
    env = dict(os.environ, POSTROOM_SMTP_PASSWORD="burst pw")
    cmd = burst_command(pdf, job, url, out)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + DEADLINE
        while sent_count(out / "ledger.sqlite") < 30:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        helpers = _descendants(proc.pid)  # its page-scanning/splitting process pool
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    # The pool dies with the burst: no orphaned worker is left waiting forever.
    assert helpers, "the 300-page burst runs a process pool"
    deadline = time.monotonic() + 10
    while [p for p in helpers if Path(f"/proc/{p}").exists()] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in helpers if Path(f"/proc/{p}").exists()], "orphaned burst workers"

    os.environ["POSTROOM_SMTP_PASSWORD"] = "burst pw"
    try:
        code = main([str(pdf), "--config", str(job), "--transport", url, "--out", str(out), "--plain"])
    finally:
        del os.environ["POSTROOM_SMTP_PASSWORD"]

    with sqlite3.connect(out / "ledger.sqlite") as db:
        status = dict(db.execute("SELECT json_extract(recipients, '$[0]'), status FROM message").fetchall())
    unknown = {a for a, s in status.items() if s == "unknown"}
    assert code == (1 if unknown else 0)
    assert len(unknown) <= 4  # only messages in flight at the kill (concurrency 4)
    assert all(s in ("sent", "unknown") for s in status.values()), status
    for c in people:
        inbox = srv.inbox(c.address)
        if c.address in unknown:  # maybe delivered before the kill; never twice
            assert len(inbox) <= 1
            continue
        assert len(inbox) == 1, f"{c.address}: {len(inbox)} messages"
        msg = parse(inbox[0])
        assert msg["Subject"] == f"Invoice for Customer {c.n}: {c.amount} EUR"
        body = msg.get_body(("plain",))
        assert body is not None and f"Dear Customer {c.n}," in body.get_content()
        assert pdf_page_titles(inbox[0]) == expected_titles(c)
    # And as a mail program sees it: every tenth customer's INBOX over IMAP (STARTTLS + LOGIN).
    if "imap" in srv.ports:
        for c in people[::10]:
            if c.address in unknown:
                continue
            imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
            try:
                imap.starttls(ssl_context=srv.client_tls())
                imap.login(c.address, "never used")
                typ, data = imap.select("INBOX", readonly=True)
                assert typ == "OK" and int(data[0] or 0) == 1, (c.address, data)
                typ, fetched = imap.fetch("1", "(BODY.PEEK[])")
                raw = next(part[1] for part in fetched if isinstance(part, tuple))
                assert pdf_page_titles(raw) == expected_titles(c)
            finally:
                imap.logout()
