"""``--to-drafts``: every message saved with IMAP APPEND into the user's Drafts on Postroom's IMAP server."""

from __future__ import annotations

import imaplib
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from burst_support import customers, expected_titles, make_report, pdf_page_titles, write_job

from conftest import RunningServer
from postroom.burst.cli import main


def test_to_drafts_over_imap_starttls(
    tmp_path: Path, server_factory: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = server_factory(services=["imap"])
    if "imap" not in srv.ports:
        pytest.skip("postroom.imap.adapter is not available")
    srv.add_user("clerk@example.test", "drafts pw")
    people = customers(4)
    pdf = make_report(tmp_path / "r.pdf", people)
    monkeypatch.setenv("POSTROOM_IMAP_PASSWORD", "drafts pw")
    url = f"imap://clerk%40example.test@127.0.0.1:{srv.ports['imap']}/Drafts?cafile={srv.cafile}"
    out = tmp_path / "out"
    args = [str(pdf), "--config", str(write_job(tmp_path)), "--to-drafts", url, "--out", str(out), "--plain"]
    assert main([*args, "--workers", "1"]) == 0
    # Re-running does not save the drafts twice (the ledger has them).
    assert main([*args, "--workers", "1"]) == 0

    imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
    try:
        imap.starttls(ssl_context=srv.client_tls())
        imap.login("clerk@example.test", "drafts pw")
        typ, data = imap.select("Drafts", readonly=True)
        assert typ == "OK" and int(data[0] or 0) == 4
        typ, fetched = imap.fetch("1:*", "(FLAGS BODY.PEEK[])")
        assert typ == "OK"
        bodies = [part[1] for part in fetched if isinstance(part, tuple)]
        flags = [part[0].decode() for part in fetched if isinstance(part, tuple)]
        assert all(re.search(r"\\Draft\b", f) for f in flags), flags
        titles = sorted(pdf_page_titles(b) for b in bodies)
        assert titles == sorted(expected_titles(c) for c in people)
    finally:
        imap.logout()
