"""Provider limits (daily allowance from the ledger, per-minute pacing) and the report's escaping."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from postroom.burst.compose import Rendered
from postroom.burst.job import daily_allowance
from postroom.burst.ledger import Ledger
from postroom.burst.plan import PageScan, make_plan
from postroom.burst.produce import Item
from postroom.burst.report import write_reports
from postroom.burst.tags import find_tags
from postroom.burst.transport import Limits, Sender, parse_transport

RENDERED = Rendered("s", "t", None, "f.pdf", None, "a@x.example", ())


def items(n: int, cc: int = 0) -> list[Item]:
    extra = "; cc=" + ", ".join(f"c{k}@x.example" for k in range(cc)) if cc else ""
    scans = [PageScan(i, tuple(find_tags(f"[[postroom to=u{i}@x.example{extra}]]"))) for i in range(1, n + 1)]
    return [Item(m, RENDERED, f"<{m.key}@x>") for m in make_plan(scans).messages]


def test_daily_message_and_recipient_limits_count_the_ledger(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite")
    earlier = items(3)
    led.prepare("old-job", [it.msg for it in earlier])
    led.update_many("old-job", [(it.msg.key, "sent", "250", {}) for it in earlier])
    t = dataclasses.replace(parse_transport("smtp://127.0.0.1"), limits=Limits(messages_per_day=5))
    allowed, note = daily_allowance(led, t, items(4))
    assert len(allowed) == 2 and "allows 2 of 4" in note and "tomorrow" in note
    t = dataclasses.replace(t, limits=Limits(recipients_per_day=10))  # 3 used; each new message has 3
    allowed, _ = daily_allowance(led, t, items(4, cc=2))
    assert len(allowed) == 2
    assert daily_allowance(led, parse_transport("smtp://127.0.0.1"), items(4)) == (items(4), "")
    led.close()


def test_per_minute_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    clock = [1000.0]

    async def fake_sleep(delay: float) -> None:
        waits.append(delay)

    monkeypatch.setattr(time, "monotonic", lambda: clock[0])  # the module's own clock and sleep
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    t = dataclasses.replace(parse_transport("smtp://127.0.0.1"), limits=Limits(messages_per_minute=30))

    async def go() -> None:
        snd = Sender(t, None)
        for _ in range(3):
            await snd._pace()

    asyncio.run(go())
    assert waits == [2.0, 4.0]  # 30 a minute: one every two seconds, the first at once


def test_html_report_escapes_everything(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite")
    msgs = [it.msg for it in items(1)]
    led.prepare("j", msgs)
    led.update_many("j", [(msgs[0].key, "failed", "550 <script>alert(1)</script>", {"filename": "<b>.pdf"})])
    csv_path, html_path = write_reports(tmp_path, led.rows("j"), title="<title>")
    page = html_path.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;.pdf" in page
    assert "<script" not in page.lower().replace("&lt;script", "")
    assert "550 <script>alert(1)</script>" in csv_path.read_text()
    led.close()
