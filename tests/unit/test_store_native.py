"""The append commit without the GIL (``sqlite_native``, the C extension ``_sqlite_fast``): the same rows
as the Python path, the same write lock, and every failure answered as on the Python path.

The tests that need the extension skip where it is not built, except in CI (``POSTROOM_REQUIRE_NATIVE=1``),
where it must be built and used."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from postroom.errors import NotFoundError, StoreError
from postroom.store import sqlite_native
from postroom.store.api import AppendTarget, OutboundEnvelope, OutboundRecipient
from postroom.store.sqlite import SqliteStore
from postroom.store.sqlite_native import NativeCommit

REQUIRED = os.environ.get("POSTROOM_REQUIRE_NATIVE") == "1"
needs_native = pytest.mark.skipif(
    sqlite_native.unavailable() is not None and not REQUIRED,
    reason=f"native commit unavailable: {sqlite_native.unavailable()}",
)


def _msg(i: int) -> bytes:
    return f"From: a@example.test\r\nTo: b@example.test\r\nSubject: n{i}\r\n\r\nbody {i} é\r\n".encode()


async def _open(path: Path) -> tuple[SqliteStore, list[int]]:
    store = SqliteStore(path)
    await store.open()
    boxes = []
    for name in ("alice@example.test", "bob@example.test"):
        account = await store.create_account(name, "x")
        inbox = await store.get_mailbox(account.id, "INBOX")
        assert inbox is not None
        boxes.append(inbox.id)
    boxes.append((await store.create_mailbox(account.id, "Projects")).id)
    return store, boxes


async def _deliveries(store: SqliteStore, boxes: list[int]) -> None:
    """Rounds of concurrent appends: one and several targets, flags, fixed internaldates."""
    a, b, archive = boxes
    for r in range(4):
        jobs = []
        for i in range(12):
            n = r * 100 + i
            targets = [AppendTarget(a, internaldate=1_000_000.0 + n)]
            if i % 3 == 0:
                targets.append(AppendTarget(b, frozenset({"\\Seen", "$Label"}), 2_000_000.0 + n))
            if i % 4 == 1:
                targets = [AppendTarget(archive, frozenset({"\\Flagged"}), 3_000_000.0 + n)]
            jobs.append(store.append(_msg(n), targets, analyze=i % 2 == 0))
        await asyncio.gather(*jobs)


def _dump(path: Path) -> dict[str, list[Any]]:
    conn = sqlite3.connect(path / "meta.db")
    try:
        return {
            "blobs": conn.execute("SELECT id, size, data, path, structure, refs FROM blobs ORDER BY id").fetchall(),
            "messages": conn.execute("SELECT * FROM messages ORDER BY mailbox_id, uid").fetchall(),
            "mailboxes": conn.execute("SELECT id, uidnext, highestmodseq FROM mailboxes ORDER BY id").fetchall(),
            "sequence": conn.execute("SELECT * FROM sqlite_sequence WHERE name='blobs'").fetchall(),
            "integrity": conn.execute("PRAGMA integrity_check").fetchall(),
        }
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def _warm(path: Path) -> AsyncIterator[tuple[SqliteStore, int, NativeCommit]]:
    """An open store, its first INBOX and its native commit, after the first commit (which runs on the
    Python path and opens the WAL's descriptor)."""
    store, (a, _b, _projects) = await _open(path)
    try:
        await store.append(_msg(0), [AppendTarget(a)])
        assert store._native is not None
        yield store, a, store._native
    finally:
        await store.close()


@needs_native
def test_native_and_python_commits_store_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def run(path: Path) -> int:
        store, boxes = await _open(path)
        try:
            await _deliveries(store, boxes)
            return store._native.commits if store._native is not None else 0
        finally:
            await store.close()

    native_commits = asyncio.run(run(tmp_path / "native"))
    monkeypatch.setenv("POSTROOM_NATIVE_COMMIT", "0")
    python_commits = asyncio.run(run(tmp_path / "python"))
    assert native_commits >= 3 and python_commits == 0  # every round after the first commit went native
    native, python = _dump(tmp_path / "native"), _dump(tmp_path / "python")
    assert native == python
    assert len(native["blobs"]) == 48 and native["integrity"] == [("ok",)]


@needs_native
def test_a_missing_mailbox_fails_alone_on_the_python_path(tmp_path: Path) -> None:
    """The native transaction stops at the unknown mailbox and rolls back; the batch runs again on the
    Python path, where that job alone fails (NotFoundError) and the others are stored once."""

    async def main() -> list[Any]:
        async with _warm(tmp_path / "s") as (store, a, native):
            before = native.commits
            jobs = [store.append(_msg(i), [AppendTarget(a if i != 3 else 999_999)]) for i in range(1, 7)]
            results = await asyncio.gather(*jobs, return_exceptions=True)
            assert native.commits == before  # declined: nothing committed natively
            return results

    results = asyncio.run(main())
    assert isinstance(results[2], NotFoundError)
    assert [r for i, r in enumerate(results) if i != 2] == [[(1, uid)] for uid in (2, 3, 4, 5, 6)]
    dump = _dump(tmp_path / "s")
    assert len(dump["blobs"]) == 6 and dump["mailboxes"][0][1:] == (7, 7)


@needs_native
def test_the_native_commit_waits_for_the_write_lock(tmp_path: Path) -> None:
    """Another writer (here a second open file description of the lock file) holds the ``flock``: the
    native commit waits for it, as the Python path does, and is answered only after it was released."""

    async def main() -> None:
        async with _warm(tmp_path / "s") as (store, a, native):
            before = native.commits
            fd = os.open(str(tmp_path / "s" / "meta.db.writer-lock"), os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                pending = asyncio.ensure_future(store.append(_msg(1), [AppendTarget(a)]))
                await asyncio.sleep(0.3)
                assert not pending.done()
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            assert await asyncio.wait_for(pending, 5) == [(a, 2)]
            assert native.commits == before + 1

    asyncio.run(main())


@needs_native
def test_a_failed_wal_sync_after_a_native_commit_fails_every_caller(tmp_path: Path) -> None:
    """Committed but not known to be on disk: the callers hear StoreError (SMTP: 451), as on the Python
    path. The WAL's descriptor is swapped for a pipe's, which fdatasync refuses (EINVAL)."""

    async def main() -> None:
        async with _warm(tmp_path / "s") as (store, a, native):
            writer = store._writer
            assert writer is not None and store._native is not None
            read_end, write_end = os.pipe()
            wal_fd, writer._wal_fd = writer._wal_fd, read_end
            try:
                results = await asyncio.gather(
                    *(store.append(_msg(i), [AppendTarget(a)]) for i in (1, 2)), return_exceptions=True
                )
            finally:
                writer._wal_fd = wal_fd
                os.close(read_end)
                os.close(write_end)
            assert all(isinstance(r, StoreError) for r in results), results
            assert native.commits >= 1
            assert await store.append(_msg(3), [AppendTarget(a)]) == [(a, 4)]  # the writer carries on

    asyncio.run(main())


@needs_native
def test_files_and_outbound_copies_take_the_python_path(tmp_path: Path) -> None:
    async def main() -> None:
        async with _warm(tmp_path / "s") as (store, a, native):
            before = native.commits
            env = OutboundEnvelope("a@example.test", (OutboundRecipient("x@elsewhere.test"),))
            assert await store.append(_msg(1), [AppendTarget(a)], env) == [(a, 2)]
            assert native.commits == before
            assert await store.append(_msg(2), [AppendTarget(a)]) == [(a, 3)]
            assert native.commits == before + 1

    asyncio.run(main())


def test_a_second_copy_of_sqlite_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two copies of SQLite in one process would not see each other's POSIX locks: the native commit is
    used only when it calls the very ``sqlite3_open_v2`` Python's module calls."""
    fake = types.SimpleNamespace(libversion=lambda: sqlite3.sqlite_version, open_v2_address=lambda: 12345)
    monkeypatch.setattr(sqlite_native, "_sqlite_fast", fake)
    assert sqlite_native.unavailable() == "Python's sqlite3 module has its own copy of SQLite"
    fake.libversion = lambda: "3.0.0"
    assert "3.0.0" in (sqlite_native.unavailable() or "")
    monkeypatch.setattr(sqlite_native, "_sqlite_fast", None)
    assert sqlite_native.unavailable() == "not built (make native)"
    assert sqlite_native.open_native(Path("unused")) is None


def test_the_native_commit_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTROOM_NATIVE_COMMIT", "0")
    assert sqlite_native.unavailable() == "disabled by POSTROOM_NATIVE_COMMIT=0"


@pytest.mark.skipif(not REQUIRED, reason="CI only (POSTROOM_REQUIRE_NATIVE=1)")
def test_ci_builds_and_uses_the_native_commit() -> None:
    assert sqlite_native.unavailable() is None
