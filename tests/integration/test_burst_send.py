"""Burst end to end against an SMTP server started in the test (aiosmtpd on 127.0.0.1:0).

Each customer must receive exactly one message holding exactly their pages (checked by page text);
retries, permanent failures, the ledger's no-duplicate rule across a SIGKILL, and the hand-off modes.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope
from burst_support import (
    Customer,
    Sink,
    burst_command,
    customers,
    expected_titles,
    make_report,
    parse,
    pdf_page_titles,
    write_job,
)

from conftest import server_tls_context
from postroom.burst.cli import main
from postroom.burst.ledger import Ledger

DEADLINE = 60.0  # seconds a subprocess may take before the test gives up


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def burst(*args: str | Path) -> int:
    return main([str(a) for a in args] + ["--plain", "--workers", "1"])


def by_recipient(s: Sink) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for m in s.messages():
        for r in m.rcpt_tos:
            out.setdefault(r, []).append(m.data)
    return out


def assert_each_got_their_pages(s: Sink, people: list[Customer]) -> None:
    got = by_recipient(s)
    assert sorted(got) == sorted(c.address for c in people)
    for cu in people:
        assert len(got[cu.address]) == 1, f"{cu.address} got {len(got[cu.address])} messages"
        raw = got[cu.address][0]
        assert pdf_page_titles(raw) == expected_titles(cu)
        assert parse(raw)["Subject"] == f"Invoice for Customer {cu.n}: {cu.amount} EUR"


def test_send_plain_smtp_each_customer_gets_only_their_pages(tmp_path: Path, sink: Sink) -> None:
    people = customers(24)
    pdf = make_report(tmp_path / "report.pdf", people, cover=True)
    job = write_job(tmp_path)
    out = tmp_path / "out"
    url = f"smtp://127.0.0.1:{sink.port}"
    assert burst(pdf, "--config", job, "--transport", url, "--out", out) == 0
    assert_each_got_their_pages(sink, people)
    assert all(m.mail_from == "billing@example.test" for m in sink.messages())
    body = parse(sink.messages()[0].data).get_body(("plain",))
    assert body is not None and "your invoice" in body.get_content()
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 24 and {r["status"] for r in rows} == {"sent"}
    assert (out / "report.html").read_text().count("<tr class='sent'>") == 24
    plan = json.loads((out / "plan.json").read_text())
    assert plan["unsent_pages"] == [1]  # the cover page

    # Same job again: the ledger says everything was accepted; nothing is sent twice.
    assert burst(pdf, "--config", job, "--transport", url, "--out", out) == 0
    assert len(sink.messages()) == 24


def test_starttls_auth_and_implicit_tls(
    tmp_path: Path, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tls_files
    people = customers(4)
    pdf = make_report(tmp_path / "r.pdf", people)
    job = write_job(tmp_path)
    monkeypatch.setenv("POSTROOM_SMTP_PASSWORD", "s3cret pass")
    for implicit in (False, True):
        s = Sink(
            tls=server_tls_context(cert, key),
            implicit_tls=implicit,
            require_auth=True,
            users={"billing": "s3cret pass"},
        )
        try:
            scheme = "smtps" if implicit else "smtp+starttls"
            url = f"{scheme}://billing@127.0.0.1:{s.port}?cafile={cert}"
            assert burst(pdf, "--config", job, "--transport", url, "--out", tmp_path / scheme) == 0
            assert_each_got_their_pages(s, people)
        finally:
            s.close()


def test_4xx_is_retried_5xx_is_failed_and_exit_code_says_so(tmp_path: Path, sink: Sink) -> None:
    people = customers(6)
    tries: Counter[str] = Counter()

    def decide(env: Envelope) -> str | None:
        rcpt = env.rcpt_tos[0]
        tries[rcpt] += 1
        if rcpt == "cust1@example.test" and tries[rcpt] < 3:
            return "451 4.3.0 try again later"
        return None

    sink.decide = decide
    sink.rcpt_decide = lambda a: "550 5.1.1 no such mailbox" if a == "cust2@example.test" else None
    pdf = make_report(tmp_path / "r.pdf", people)
    out = tmp_path / "out"
    url = f"smtp://127.0.0.1:{sink.port}"
    args = (pdf, "--config", write_job(tmp_path), "--transport", url, "--out", out, "--backoff", "0.01")
    assert burst(*args) == 1
    got = by_recipient(sink)
    assert len(got["cust1@example.test"]) == 1 and tries["cust1@example.test"] == 3
    assert "cust2@example.test" not in got and len(got) == 5
    rows = {r["recipients"]: r for r in csv.DictReader((out / "report.csv").open())}
    assert rows["cust2@example.test"]["status"] == "failed"
    assert rows["cust2@example.test"]["reply"].startswith("550")
    # A re-run does not retry a 5xx (it would fail again) unless asked; it still reports the failure.
    assert burst(*args) == 1
    assert len(sink.messages()) == 5
    sink.rcpt_decide = None
    assert burst(*args, "--retry-failed") == 0
    assert len(by_recipient(sink)["cust2@example.test"]) == 1


def _wait_for(cond: object, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():  # type: ignore[operator]
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the burst did not get far enough"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_midway_then_rerun_sends_the_rest_without_duplicates(tmp_path: Path, sink: Sink) -> None:
    people = customers(40)
    pdf = make_report(tmp_path / "r.pdf", people)
    job = write_job(tmp_path)
    out = tmp_path / "out"
    # The 13th message is committed by the server, but its reply is held: the burst dies waiting for it.
    sink.hold_after = 12
    url = f"smtp://127.0.0.1:{sink.port}?concurrency=1"
    cmd = burst_command(pdf, job, url, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: len(sink.messages()) >= 13, proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    sink.gate.set()
    sink.hold_after = None
    assert len(sink.messages()) == 13

    # Re-run: the 13th is 'unknown' (maybe accepted) and held back; all others go out exactly once.
    assert burst(pdf, "--config", job, "--transport", url, "--out", out) == 1
    assert_each_got_their_pages(sink, people)
    ledger = Ledger(out / "ledger.sqlite")
    statuses = Counter(r.status for r in ledger.rows(ledger.jobs()[0]))
    ledger.close()
    assert statuses == {"sent": 39, "unknown": 1}


@pytest.mark.slow
def test_sigkill_with_concurrency_never_duplicates(tmp_path: Path, sink: Sink) -> None:
    people = customers(60)
    pdf = make_report(tmp_path / "r.pdf", people)
    job = write_job(tmp_path)
    out = tmp_path / "out"
    url = f"smtp://127.0.0.1:{sink.port}?concurrency=4"
    cmd = burst_command(pdf, job, url, out, "--workers", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: len(sink.messages()) >= 20, proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    burst(pdf, "--config", job, "--transport", url, "--out", out)
    got = by_recipient(sink)
    assert all(len(v) == 1 for v in got.values()), {k: len(v) for k, v in got.items() if len(v) > 1}
    ledger = Ledger(out / "ledger.sqlite")
    rows = ledger.rows(ledger.jobs()[0])
    ledger.close()
    for r in rows:
        if r.status == "sent":
            assert r.recipients[0] in got
        else:  # only messages that were in flight at the kill can be unknown, and they are at most once
            assert r.status == "unknown", r
    assert sum(r.status == "unknown" for r in rows) <= 4
    assert len(got) >= 56


def test_dry_run_and_to_eml_connect_nowhere(tmp_path: Path) -> None:
    people = customers(5)
    pdf = make_report(tmp_path / "r.pdf", people)
    job = write_job(tmp_path)
    out = tmp_path / "out"
    assert burst(pdf, "--config", job, "--dry-run", "--out", out) == 0
    emls = sorted((out / "eml").glob("*.eml"))
    assert len(emls) == 5 and (out / "preflight.txt").read_text() == "no problems\n"
    assert pdf_page_titles(emls[0].read_bytes()) == expected_titles(people[0])
    assert not (out / "ledger.sqlite").exists()
    target = tmp_path / "hand-off"
    assert burst(pdf, "--config", job, "--to-eml", target, "--out", out) == 0
    assert sorted(p.name for p in target.glob("*.eml")) == [p.name for p in emls]


def test_test_to_sends_everything_to_one_address_first(tmp_path: Path, sink: Sink) -> None:
    people = customers(3)
    pdf = make_report(tmp_path / "r.pdf", people)
    job = write_job(tmp_path)
    url = f"smtp://127.0.0.1:{sink.port}"
    out = tmp_path / "out"
    assert burst(pdf, "--config", job, "--transport", url, "--out", out, "--test-to", "boss@example.test") == 0
    assert [m.rcpt_tos for m in sink.messages()] == [["boss@example.test"]] * 3
    test_for = sorted(parse(m.data)["X-Postroom-Burst-Test-For"] for m in sink.messages())
    assert test_for == sorted(c.address for c in people)
    # Approval given: the real run sends to the customers (the test run did not count as sent).
    assert burst(pdf, "--config", job, "--transport", url, "--out", out) == 0
    assert sorted(by_recipient(sink)) == ["boss@example.test", *sorted(c.address for c in people)]


def test_invalid_address_blocks_the_job_unless_skip_invalid(tmp_path: Path, sink: Sink) -> None:
    people = [*customers(3), Customer(99, "not-an-address", syntax="pdfexplode")]
    pdf = make_report(tmp_path / "r.pdf", people)
    job = write_job(tmp_path)
    url = f"smtp://127.0.0.1:{sink.port}"
    out = tmp_path / "out"
    assert burst(pdf, "--config", job, "--transport", url, "--out", out) == 1
    assert sink.messages() == []
    assert "page 6" in (out / "preflight.txt").read_text() and "invalid address" in (out / "preflight.txt").read_text()
    assert burst(pdf, "--config", job, "--transport", url, "--out", out, "--skip-invalid") == 0
    assert len(sink.messages()) == 3


def test_without_config_the_login_is_the_sender(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Sink(require_auth=True, users={"me@example.test": "pw"})
    try:
        monkeypatch.setenv("POSTROOM_SMTP_PASSWORD", "pw")
        from reportlab.pdfgen import canvas

        pdf = tmp_path / "r.pdf"
        c = canvas.Canvas(str(pdf))
        for i in range(2):
            c.drawString(72, 700, f"<pdfexplode>c{i}@example.test</pdfexplode>")  # no message id: default
            c.showPage()
        c.save()
        url = f"smtp://me%40example.test@127.0.0.1:{s.port}"  # AUTH without TLS: loopback only
        assert burst(pdf, "--transport", url, "--out", tmp_path / "out") == 0
        msgs = s.messages()
        assert len(msgs) == 2 and {m.mail_from for m in msgs} == {"me@example.test"}
        assert {parse(m.data)["From"] for m in msgs} == {"me@example.test"}
        assert parse(msgs[0].data)["Subject"].startswith("Your document r-")
    finally:
        s.close()


def test_internationalised_address_uses_smtputf8(tmp_path: Path, sink: Sink) -> None:
    people = [Customer(1, "jörg@example.test", syntax="native"), Customer(2, "ann@example.test")]
    pdf = make_report(tmp_path / "r.pdf", people)
    url = f"smtp://127.0.0.1:{sink.port}"
    assert burst(pdf, "--config", write_job(tmp_path), "--transport", url, "--out", tmp_path / "o") == 0
    got = by_recipient(sink)
    assert sorted(got) == ["ann@example.test", "jörg@example.test"]
    raw = got["jörg@example.test"][0]
    assert "To: jörg@example.test".encode() in raw  # RFC 6532: the address in UTF-8
    assert pdf_page_titles(raw) == expected_titles(people[0])


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_rerun_finishes(tmp_path: Path, sink: Sink) -> None:
    people = customers(20)
    pdf = make_report(tmp_path / "r.pdf", people)
    job = write_job(tmp_path)
    out = tmp_path / "out"
    sink.hold_after = 5
    url = f"smtp://127.0.0.1:{sink.port}?concurrency=1"
    cmd = burst_command(pdf, job, url, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: len(sink.messages()) >= 6, proc)
        os.kill(proc.pid, signal.SIGINT)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    sink.gate.set()
    sink.hold_after = None
    assert proc.returncode == 130 and b"interrupted: run the same command again" in stdout
    assert burst(pdf, "--config", job, "--transport", url, "--out", out) == 1  # the 6th is 'unknown'
    assert_each_got_their_pages(sink, people)
