"""The ledger's state rules: what a re-run may send, and what it must never send again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from postroom.burst import ledger as ledger_mod
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


C = "<pdfexplode>c@x.example</pdfexplode>"
D = "<pdfexplode>d@x.example</pdfexplode>"


def _run_and_die(led: Ledger, job: str, script: Callable[[LedgerWriter], Awaitable[None]]) -> None:
    """Run ``script`` with a writer, then leave as a SIGKILL would: nothing more reaches the ledger."""

    async def go() -> None:
        lw = LedgerWriter(led, job)
        await lw.__aenter__()
        await script(lw)
        assert lw._task is not None
        lw._task.cancel()  # the process is gone: pending updates are lost, the journal is what was written
        with contextlib.suppress(asyncio.CancelledError):
            await lw._task
        lw.journal.close()

    asyncio.run(go())


def test_reserved_but_never_started_goes_back_to_planned_after_a_kill(tmp_path: Path) -> None:
    msgs = plan(A, B, C, D)
    led = Ledger(tmp_path / "ledger.sqlite")
    led.prepare("job", msgs)

    async def script(lw: LedgerWriter) -> None:
        marks = [lw.reserve(m.key, message_id=f"<{m.seq}@x>") for m in msgs]
        await asyncio.gather(*marks)  # all four durable "sending"
        lw.started(msgs[0].key)
        lw.update_soon(msgs[0].key, "sent", "250 ok")  # outcome journaled, its commit never happens
        lw.started(msgs[1].key)  # DATA in flight at the kill
        lw.update_soon(msgs[2].key, "deferred", "451 later")  # never started, outcome known

    _run_and_die(led, "job", script)
    assert {r.status for r in led.rows("job")} == {"sending"}
    assert (tmp_path / "ledger.sendlog").exists()
    rows = led.prepare("job", msgs)
    got = {m.seq: (rows[m.key].status, rows[m.key].attempts) for m in msgs}
    assert [got[m.seq][0] for m in msgs] == ["sent", "unknown", "deferred", "planned"]
    assert got[msgs[3].seq][1] == 0 and rows[msgs[3].key].message_id == f"<{msgs[3].seq}@x>"
    assert not (tmp_path / "ledger.sendlog").exists()
    led.close()


def test_untrusted_journal_leaves_every_sending_row_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    msgs = plan(A, B)
    for case in ("other boot", "writer alive", "unreadable line", "torn last line"):
        led = Ledger(tmp_path / case / "ledger.sqlite")
        led.prepare("job", msgs)

        async def script(lw: LedgerWriter) -> None:
            await asyncio.gather(*(lw.reserve(m.key) for m in msgs))

        _run_and_die(led, "job", script)
        log = tmp_path / case / "ledger.sendlog"
        if case == "other boot":  # the OS crashed: unsynced journal lines may be missing
            log.write_text(log.read_text().replace(ledger_mod._boot_id(), "another-boot"))
        elif case == "writer alive":  # another burst still runs on this ledger
            monkeypatch.setattr(ledger_mod, "_alive", lambda pid: True)
        elif case == "unreadable line":
            with log.open("a") as f:
                f.write("S\tjob\n")
        else:  # killed in the middle of storing an S line: its DATA had not begun
            with log.open("a") as f:
                f.write("S\tjob\t" + msgs[0].key[:5])
        rows = led.prepare("job", msgs)
        expected = ["planned", "planned"] if case == "torn last line" else ["unknown", "unknown"]
        assert [rows[m.key].status for m in msgs] == expected, case
        monkeypatch.undo()
        led.close()
