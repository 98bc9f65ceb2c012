"""The ledger's state rules: what a re-run may send, and what it must never send again."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postroom.burst.jobconfig import GroupMode
from postroom.burst.ledger import RESENDABLE, Ledger, LedgerWriter
from postroom.burst.plan import PageScan, PlannedMessage, make_plan
from postroom.burst.tags import find_tags


def plan(*pages: str, group: GroupMode = "consecutive") -> tuple[PlannedMessage, ...]:
    scans = [PageScan(i, tuple(find_tags(t))) for i, t in enumerate(pages, 1)]
    return make_plan(scans, group=group).messages


A = "<pdfexplode>a@x.example</pdfexplode>"
B = "<pdfexplode>b@x.example</pdfexplode>"


def test_states_across_runs(tmp_path: Path) -> None:
    msgs = plan(A, B, "<pdfexplode>c@x.example</pdfexplode>", "<pdfexplode>d@x.example</pdfexplode>")
    led = Ledger(tmp_path / "l.sqlite")
    rows = led.prepare("job", msgs)
    assert {r.status for r in rows.values()} == {"planned"}
    led.update_many(
        "job",
        [
            (msgs[0].key, "sent", "250 ok", {"message_id": "<m1@x>"}),
            (msgs[1].key, "sending", "", {}),  # the run dies here
            (msgs[2].key, "failed", "550 no", {}),
            (msgs[3].key, "deferred", "451 later", {}),
        ],
    )
    led.close()

    led = Ledger(tmp_path / "l.sqlite")  # the next run
    rows = led.prepare("job", msgs)
    assert [rows[m.key].status for m in msgs] == ["sent", "unknown", "failed", "deferred"]
    assert rows[msgs[0].key].message_id == "<m1@x>" and rows[msgs[1].key].attempts == 1
    assert [m for m in msgs if rows[m.key].status in RESENDABLE] == [msgs[3]]
    rows = led.prepare("job", msgs, resend_unknown=True, retry_failed=True)
    assert [rows[m.key].status for m in msgs] == ["sent", "planned", "planned", "deferred"]
    led.close()


def test_changed_grouping_never_resends_pages_already_sent(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite")
    first = plan(A, B, A)  # consecutive: a gets pages 1 and 3 as two messages
    led.prepare("job", first)
    led.update_many("job", [(first[0].key, "sent", "250", {})])
    second = plan(A, B, A, group="all")  # now a's pages 1 and 3 are one message
    rows = led.prepare("job", second)
    assert rows[second[0].key].status == "skipped" and "already went" in rows[second[0].key].reply
    assert rows[second[1].key].status == "planned"
    led.close()


def test_writer_commits_every_update_even_when_not_awaited(tmp_path: Path) -> None:
    msgs = plan(A, B)
    led = Ledger(tmp_path / "l.sqlite")
    led.prepare("job", msgs)

    async def go() -> None:
        async with LedgerWriter(led, "job") as lw:
            await asyncio.gather(*(lw.update(m.key, "sending") for m in msgs))
            for m in msgs:
                lw.update_soon(m.key, "sent", "250 ok")

    asyncio.run(go())
    led.close()
    led = Ledger(tmp_path / "l.sqlite")
    assert [r.status for r in led.rows("job")] == ["sent", "sent"]
    assert led.sent_since(0) == (2, 2)
    led.close()
