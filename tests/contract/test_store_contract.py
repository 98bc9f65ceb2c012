"""The store contract: every backend must pass these (parametrised by ``store_url``).

Covers UID/MODSEQ monotonicity (also across restarts), concurrency (two writers and a reader), the
change feed (in this process and from another process), flags/expunge/copy/move semantics, the queue, and
durability across ``kill -9`` of a writer process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from postroom.errors import AlreadyExistsError, NotFoundError, StoreError
from postroom.store.api import AppendTarget, OutboundEnvelope, OutboundRecipient, Store
from postroom.store.sqlite import INLINE_MAX, open_store

MSG = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: contract\r\n\r\nhello contract world\r\n"

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["sqlite", "sqlite-python-commit"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The SQLite store, with appends committed natively where built (``sqlite_native``) and on the
    Python path."""
    if request.param == "sqlite-python-commit":
        monkeypatch.setenv("POSTROOM_NATIVE_COMMIT", "0")
    return f"sqlite:///{tmp_path / 'store'}"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = open_store(store_url)
    await s.open()
    yield s
    await s.close()


async def _inbox(store: Store, address: str = "alice@example.test") -> int:
    acct = await store.get_account(address) or await store.create_account(address, "x")
    mb = await store.get_mailbox(acct.id, "INBOX")
    assert mb is not None
    return mb.id


async def test_accounts_and_default_mailboxes(store: Store) -> None:
    acct = await store.create_account("Alice@Example.test", "hash")
    assert acct.address == "alice@example.test"
    names = {m.name: m.special_use for m in await store.list_mailboxes(acct.id)}
    assert names == {
        "INBOX": None,
        "Sent": "\\Sent",
        "Drafts": "\\Drafts",
        "Trash": "\\Trash",
        "Junk": "\\Junk",
        "Archive": "\\Archive",
    }
    with pytest.raises(AlreadyExistsError):
        await store.create_account("alice@example.test", "hash")
    assert (await store.get_mailbox(acct.id, "inbox")) is not None
    await store.add_alias("sales@example.test", "alice@example.test")
    resolved = await store.resolve("SALES@example.test")
    assert resolved is not None and resolved.id == acct.id
    assert await store.resolve("nobody@example.test") is None
    await store.delete_account("alice@example.test")
    assert await store.get_account("alice@example.test") is None
    with pytest.raises(NotFoundError):
        await store.delete_account("alice@example.test")


async def test_uids_and_modseq_grow(store: Store) -> None:
    mb = await _inbox(store)
    results = await asyncio.gather(*[store.append(MSG, [AppendTarget(mb)]) for _ in range(50)])
    uids = [r[0][1] for r in results]
    assert sorted(uids) == list(range(1, 51))
    metas = await store.messages(mb)
    assert [m.uid for m in metas] == list(range(1, 51))
    modseqs = [m.modseq for m in metas]
    assert len(set(modseqs)) == 50
    before = (await store.status(mb)).highestmodseq
    changed, failed = await store.set_flags(mb, [1, 2], "add", ["\\Seen"])
    assert [m.uid for m in changed] == [1, 2] and not failed
    assert all(m.modseq > before for m in changed)
    # Unchanged flags: no new MODSEQ.
    again, _ = await store.set_flags(mb, [1], "add", ["\\Seen"])
    assert again == []
    # CONDSTORE: UNCHANGEDSINCE below the message's MODSEQ fails that message.
    _, failed = await store.set_flags(mb, [1], "remove", ["\\Seen"], unchanged_since=before)
    assert failed == [1]


async def test_concurrent_appends_get_the_rows_of_one_by_one(store: Store) -> None:
    """Appends that share a commit (the SQLite store runs them as one bulk job) get what appending one by
    one would give: per mailbox, consecutive UIDs and growing MODSEQs; one stored copy per append; an
    append to a mailbox deleted meanwhile fails alone."""
    acct = await store.create_account("bulk@example.test", "x")
    inbox = await store.get_mailbox(acct.id, "INBOX")
    gone = await store.create_mailbox(acct.id, "Gone")
    other = await store.create_mailbox(acct.id, "Other")
    assert inbox is not None
    await store.delete_mailbox(acct.id, "Gone")
    out = OutboundEnvelope("bulk@example.test", (OutboundRecipient("far@elsewhere.test"),))
    calls = []
    for i in range(40):
        body = MSG + f"number {i}\r\n".encode()
        if i == 17:
            calls.append(store.append(body, [AppendTarget(gone.id)]))
        elif i % 5 == 0:
            calls.append(store.append(body, [AppendTarget(inbox.id), AppendTarget(other.id, frozenset({"\\Seen"}))]))
        elif i % 7 == 0:
            calls.append(store.append(body, [AppendTarget(inbox.id)], out))
        else:
            calls.append(store.append(body, [AppendTarget(inbox.id)]))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[17], NotFoundError)
    placed = [r for i, r in enumerate(results) if i != 17 and isinstance(r, list)]
    assert len(placed) == 39  # every other append succeeded
    inbox_uids = [uid for r in placed for mb, uid in r if mb == inbox.id]
    other_uids = [uid for r in placed for mb, uid in r if mb == other.id]
    assert sorted(inbox_uids) == list(range(1, 40))
    assert sorted(other_uids) == list(range(1, 9))
    metas = await store.messages(inbox.id)
    assert [m.uid for m in metas] == list(range(1, 40))
    assert [m.modseq for m in metas] == sorted({m.modseq for m in metas})  # distinct, growing with the UID
    others = await store.messages(other.id)
    assert all(m.flags == frozenset({"\\Seen"}) for m in others)
    by_uid = {m.uid: m for m in metas}
    for i, r in enumerate(results):  # each append's copies share one blob holding its own bytes
        if i == 17:
            continue
        assert isinstance(r, list)
        blobs = {
            by_uid[uid].blob_id if mb == inbox.id else next(m.blob_id for m in others if m.uid == uid) for mb, uid in r
        }
        assert len(blobs) == 1
        assert (await store.read(blobs.pop())).endswith(f"number {i}\r\n".encode())
    queued = await store.queue_due(time.time() + 1, limit=100)
    assert len(queued) == len([i for i in range(40) if i % 7 == 0 and i % 5 != 0])


async def test_uid_monotonic_across_restart(store_url: str) -> None:
    s = open_store(store_url)
    await s.open()
    mb = await _inbox(s)
    for _ in range(3):
        await s.append(MSG, [AppendTarget(mb)])
    await s.set_flags(mb, [3], "add", ["\\Deleted"])
    assert await s.expunge(mb) == [3]
    status = await s.status(mb)
    await s.close()
    s2 = open_store(store_url)
    await s2.open()
    try:
        ((_, uid),) = await s2.append(MSG, [AppendTarget(mb)])
        assert uid == 4  # never reuses the expunged UID 3
        assert (await s2.status(mb)).uidvalidity == status.uidvalidity
        assert (await s2.status(mb)).highestmodseq > status.highestmodseq
    finally:
        await s2.close()


async def test_two_writers_one_reader(store: Store) -> None:
    a = await _inbox(store, "a@example.test")
    b = await _inbox(store, "b@example.test")
    seen_counts: list[int] = []

    async def writer(mb: int) -> None:
        for _ in range(100):
            await store.append(MSG, [AppendTarget(mb)])

    async def reader() -> None:
        for _ in range(50):
            seen_counts.append(len(await store.messages(a)))
            await asyncio.sleep(0)

    await asyncio.gather(writer(a), writer(b), reader())
    assert seen_counts == sorted(seen_counts)  # a reader never sees the count go back
    assert len(await store.messages(a)) == 100
    assert len(await store.messages(b)) == 100


async def test_shared_copy_and_flags_expunge_copy_move(store: Store) -> None:
    a = await _inbox(store, "a@example.test")
    b = await _inbox(store, "b@example.test")
    res = await store.append(MSG, [AppendTarget(a, frozenset({"\\Flagged"})), AppendTarget(b)])
    assert [r[1] for r in res] == [1, 1]
    ma, mb_ = (await store.messages(a))[0], (await store.messages(b))[0]
    assert ma.blob_id == mb_.blob_id  # one stored copy for all local recipients
    assert ma.flags == {"\\Flagged"} and mb_.flags == frozenset()
    assert await store.read(ma.blob_id) == MSG
    assert await store.read_range(ma.blob_id, 6, 14) == b"a@example.test"
    acct = await store.get_account("a@example.test")
    assert acct is not None
    archive = await store.get_mailbox(acct.id, "Archive")
    assert archive is not None
    assert await store.copy(a, [1], archive.id) == [(1, 1)]
    assert await store.move(archive.id, [1], a) == [(1, 2)]
    assert await store.messages(archive.id) == []
    changes = await store.changes_since(archive.id, 0)
    assert changes.expunged == [1]
    # Deleting the last reference removes the bytes.
    await store.delete_messages(a, [1, 2])
    await store.delete_messages(b, [1])
    with pytest.raises(NotFoundError):
        await store.read(ma.blob_id)


async def test_large_message_goes_to_file(store: Store) -> None:
    mb = await _inbox(store)
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (INLINE_MAX // 1000 + 10)
    await store.append(big, [AppendTarget(mb)])
    meta = (await store.messages(mb))[0]
    assert meta.size == len(big)
    assert await store.read(meta.blob_id) == big
    assert await store.read_range(meta.blob_id, len(big) - 3, 100) == b"x\r\n"
    assert await store.read_range(meta.blob_id, 0, 12) == b"Subject: big"


async def test_change_feed_in_process(store: Store) -> None:
    mb = await _inbox(store)
    watch = store.watch(mb)
    assert not watch.pending
    await store.append(MSG, [AppendTarget(mb)])
    await asyncio.wait_for(watch.wait(), 5)
    changes = await store.changes_since(mb, 0)
    assert [m.uid for m in changes.changed] == [1]
    watch.clear()
    base = changes.highestmodseq
    await store.set_flags(mb, [1], "add", ["\\Seen"])
    await asyncio.wait_for(watch.wait(), 5)
    changes = await store.changes_since(mb, base)
    assert [(m.uid, m.flags) for m in changes.changed] == [(1, frozenset({"\\Seen"}))]
    watch.close()


async def test_change_feed_across_processes(store: Store, store_url: str) -> None:
    mb = await _inbox(store)
    watch = store.watch(mb)
    before = await store.changes_since(mb, 0)  # the reading connections have a snapshot before the commit
    assert not before.changed
    code = textwrap.dedent(
        f"""
        import asyncio
        from postroom.store.sqlite import open_store
        from postroom.store.api import AppendTarget
        async def main():
            s = open_store({store_url!r}); await s.open()
            await s.append({MSG!r}, [AppendTarget({mb})])
            await s.close()
        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    assert await proc.wait() == 0
    await asyncio.wait_for(watch.wait(), 5)
    assert len(await store.messages(mb)) == 1
    after = await store.changes_since(mb, before.highestmodseq)  # a read made after the announcement sees it
    assert [m.uid for m in after.changed] == [1]
    assert await store.read(after.changed[0].blob_id) == MSG


async def test_search_text(store: Store) -> None:
    mb = await _inbox(store)
    await store.append(b"Subject: invoice 42\r\n\r\nplease pay the amount\r\n", [AppendTarget(mb)])
    await store.append(b"Subject: hello\r\n\r\nnothing to see\r\n", [AppendTarget(mb)])
    assert await store.search_text(mb, ["invoice"]) == {1}
    assert await store.search_text(mb, ["PAY", "amount"]) == {1}
    assert await store.search_text(mb, ["see"]) == {2}
    assert await store.search_text(mb, ["zebra"]) == set()
    assert await store.search_text(mb, ["pay"], body_only=True) == {1}
    assert await store.search_text(mb, ["invoice"], body_only=True) == set()  # only in a header
    assert await store.search_text(mb, ["42"]) == {1}  # under 3 characters: no trigram, still found
    # A deleted message leaves the index; what remains is still found.
    await store.delete_messages(mb, [1])
    assert await store.search_text(mb, ["invoice"]) == set()
    await store.append(b"Subject: invoice 43\r\n\r\nagain\r\n", [AppendTarget(mb)])
    assert await store.search_text(mb, ["invoice"]) == {3}
    assert await store.search_text(mb, ["see"]) == {2}


async def test_queue_roundtrip(store: Store) -> None:
    mb = await _inbox(store)
    env = OutboundEnvelope(
        "alice@example.test",
        (OutboundRecipient("bob@remote.test", notify="FAILURE"), OutboundRecipient("carol@other.test")),
    )
    await store.append(MSG, [AppendTarget(mb)], outbound=env)
    watch = store.queue_watch()
    due = await store.queue_due(now=10**10)
    assert {e.recipient for e in due} == {"bob@remote.test", "carol@other.test"}
    assert await store.queue_due(now=10**10) == []  # claimed
    assert await store.read_queued(due[0].message_id) == MSG
    await store.queue_update(due[0].id, "deferred", "451 try later", next_attempt=10**11)
    await store.queue_update(due[1].id, "delivered", "250 ok")
    assert await store.queue_retry() == 1
    await asyncio.wait_for(watch.wait(), 5)
    entries = {e.recipient: e for e in await store.queue_list()}
    assert entries["bob@remote.test"].attempts == 1 and entries["bob@remote.test"].notify == "FAILURE"
    assert await store.queue_delete([due[0].id]) == 1


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from postroom.store.sqlite import open_store
    from postroom.store.api import AppendTarget
    async def one(s, mb, i):
        body = (b"Subject: m%d\\r\\n\\r\\n" % (ROUND + i)) + b"y" * 5000 + b"\\r\\n"
        await s.append(body, [AppendTarget(mb)])
        sys.stdout.write("%d\\n" % (ROUND + i)); sys.stdout.flush()
    async def main(url, mb):
        s = open_store(url); await s.open()
        i = 0
        while True:
            await asyncio.gather(*[one(s, mb, i + k) for k in range(20)])
            i += 20
    ROUND = int(sys.argv[3])
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


@pytest.mark.slow
async def test_kill9_loses_nothing_acknowledged(store_url: str, tmp_path: Path) -> None:
    s = open_store(store_url)
    await s.open()
    mb = await _inbox(s)
    await s.close()
    acknowledged: set[int] = set()
    for round_no in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, store_url, str(mb), str(round_no * 1_000_000)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        for count, line in enumerate(proc.stdout, 1):
            acknowledged.add(int(line))
            if count >= 100 + round_no * 37:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    s = open_store(store_url)
    await s.open()
    try:
        metas = await s.messages(mb)
        subjects: set[int] = set()
        for m in metas:
            raw = await s.read(m.blob_id)
            assert raw.endswith(b"y" * 5000 + b"\r\n"), "a stored message is truncated"
            subjects.add(int(raw.split(b"\r\n", 1)[0].split(b"m", 1)[1]))
        missing = acknowledged - subjects
        assert not missing, f"acknowledged but lost: {sorted(missing)[:10]}"
        assert [m.uid for m in metas] == sorted(m.uid for m in metas)
    finally:
        await s.close()


async def test_sqlite_fulltext_index_stays_consistent(store: Store, store_url: str) -> None:
    """SQLite only: the external-content FTS index passes its integrity check after deletions."""
    import sqlite3

    mb = await _inbox(store)
    for i in range(30):
        await store.append(b"Subject: t%d\r\n\r\nbody words %d\r\n" % (i, i), [AppendTarget(mb)])
    assert len(await store.search_text(mb, ["body"])) == 30
    await store.delete_messages(mb, list(range(1, 20)))
    assert await store.search_text(mb, ["words"]) == set(range(20, 31))
    conn = sqlite3.connect(Path(store_url.removeprefix("sqlite:///")) / "meta.db")
    try:
        conn.execute("INSERT INTO fts(fts) VALUES('integrity-check')")  # raises when inconsistent
    finally:
        conn.close()


async def test_search_finds_large_and_concurrently_indexed_messages(store: Store) -> None:
    """The index is derived from the bytes behind delivery: messages in files are found too, and searches
    catching up at the same time index every message once."""
    mb = await _inbox(store)
    big = b"Subject: big\r\n\r\nneedle-in-file\r\n" + (b"y" * 998 + b"\r\n") * (INLINE_MAX // 1000 + 10)
    await store.append(big, [AppendTarget(mb)])
    for i in range(40):
        await store.append(b"Subject: n%d\r\n\r\nshared term %d\r\n" % (i, i), [AppendTarget(mb)])
    results = await asyncio.gather(*[store.search_text(mb, ["shared"]) for _ in range(4)])
    assert all(r == set(range(2, 42)) for r in results)
    assert await store.search_text(mb, ["needle-in-file"], body_only=True) == {1}


async def test_sqlite_catch_up_skips_a_blob_deleted_meanwhile(store: Store) -> None:
    """SQLite only: a blob deleted between the indexer's read and its write is not indexed, and the
    watermark still moves past it."""
    from postroom.store.sqlite import SqliteStore

    assert isinstance(store, SqliteStore)
    mb = await _inbox(store)
    for i in range(3):
        await store.append(b"Subject: gone %d\r\n\r\nbody\r\n" % i, [AppendTarget(mb)])
    pending = await store._read(store._unindexed)
    assert [p[0] for p in pending] == [1, 2, 3]
    await store.delete_messages(mb, [2])
    texts = store._derive_texts(pending)
    await store._write(store._index_chunk_tx(texts, pending[-1][0]))
    assert await store._read(store._unindexed) == []
    assert await store.search_text(mb, ["gone"]) == {1, 3}
    await store.delete_messages(mb, [1, 3])  # the indexed ones leave the index cleanly
    assert await store.search_text(mb, ["gone"]) == set()


async def test_sqlite_indexer_moves_past_a_message_whose_text_fails(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite only: when deriving one message's text raises (a planted parser bug), it is logged and
    indexed as empty, and the messages after it are still found."""
    from postroom.store import sqlite_search
    from postroom.store.sqlite import SqliteStore

    assert isinstance(store, SqliteStore)
    mb = await _inbox(store)
    for i in range(3):
        await store.append(b"Subject: s%d\r\n\r\nfindme %s\r\n" % (i, b"POISON" if i == 1 else b""), [AppendTarget(mb)])
    real = sqlite_search.searchable_text  # type: ignore[attr-defined]

    def planted(raw: bytes) -> tuple[str, str]:
        if b"POISON" in raw:
            raise ValueError("planted")
        return real(raw)

    monkeypatch.setattr(sqlite_search, "searchable_text", planted)
    assert await store.search_text(mb, ["findme"]) == {1, 3}
    assert "no searchable text derived" in caplog.text
    await store.append(b"Subject: later\r\n\r\nfindme\r\n", [AppendTarget(mb)])
    assert await store.search_text(mb, ["findme"]) == {1, 3, 4}


async def test_rename_inbox_moves_messages_and_leaves_tombstones(store: Store) -> None:
    mb = await _inbox(store)
    acct = await store.get_account("alice@example.test")
    assert acct is not None
    for _ in range(3):
        await store.append(MSG, [AppendTarget(mb)])
    before = await store.status(mb)
    await store.rename_mailbox(acct.id, "INBOX", "Old")
    after = await store.status(mb)
    assert after.messages == 0
    assert after.uidvalidity == before.uidvalidity and after.uidnext == before.uidnext  # UIDs never reused
    changes = await store.changes_since(mb, before.highestmodseq)
    assert changes.expunged == [1, 2, 3]  # a session with INBOX selected sees them go
    old = await store.get_mailbox(acct.id, "Old")
    assert old is not None and [m.uid for m in await store.messages(old.id)] == [1, 2, 3]
    ((_, uid),) = await store.append(MSG, [AppendTarget(mb)])
    assert uid == 4
    with pytest.raises(StoreError):
        await store.rename_mailbox(acct.id, "Old", "Old/Child")


async def test_structure_of_an_older_version_is_analysed_again(store: Store, store_url: str) -> None:
    """Rows written by an older Postroom (lower structure version) are re-analysed once, on first read."""
    import sqlite3

    from postroom.mime import STRUCTURE_VERSION

    mb = await _inbox(store)
    await store.append(MSG, [AppendTarget(mb)])
    blob = (await store.messages(mb))[0].blob_id
    assert await store.search_text(mb, ["contract"]) == {1}  # indexed with the current text
    conn = sqlite3.connect(Path(store_url.removeprefix("sqlite:///")) / "meta.db")
    with conn:
        conn.execute("UPDATE blobs SET structure='{\"v\": 1}' WHERE id=?", (blob,))
    conn.close()
    st = (await store.structures([blob]))[blob]
    assert st["v"] == STRUCTURE_VERSION and "body" in st
    assert (await store.structures([blob]))[blob] == st  # stored: the next read needs no analysis
    assert await store.search_text(mb, ["contract"]) == {1}


async def test_append_without_analysis_is_analysed_once_at_first_read(store: Store) -> None:
    """``append(..., analyze=False)`` (SMTP delivery) stores the bytes now and the structure at the first
    ``structures`` call: what ``analyze`` gives, for every message asked for in one call, kept for later
    reads; search finds the messages meanwhile (the index reads the bytes)."""
    from postroom.mime import analyze

    mb = await _inbox(store)
    raws = [MSG.replace(b"contract", b"deferred %d" % i) for i in range(3)]
    for raw in raws:
        await store.append(raw, [AppendTarget(mb)], analyze=False)
    assert await store.search_text(mb, ["deferred"]) == {1, 2, 3}
    blobs = [m.blob_id for m in await store.messages(mb)]
    first = await store.structures(blobs)
    assert [first[b] for b in blobs] == [analyze(raw) for raw in raws]
    assert await store.structures(blobs) == first


async def test_sqlite_deferred_analysis_of_a_vanished_message(
    store: Store, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite only: a pending message whose bytes are gone by the time it is analysed (expunged by another
    session in between) gets an empty message's structure, not an error for the whole FETCH."""
    import sqlite3

    from postroom.store.sqlite import SqliteStore

    assert isinstance(store, SqliteStore)
    mb = await _inbox(store)
    await store.append(MSG, [AppendTarget(mb)], analyze=False)
    blob = (await store.messages(mb))[0].blob_id
    real_read = store._read
    reads = 0

    async def racing(fn: Any, on_loop: bool = False) -> Any:
        nonlocal reads
        reads += 1
        if reads == 2:  # after the pending structure was read, before the bytes are: another session deletes
            conn = sqlite3.connect(Path(store_url.removeprefix("sqlite:///")) / "meta.db")
            with conn:
                conn.execute("DELETE FROM messages WHERE blob_id=?", (blob,))
                conn.execute("DELETE FROM blobs WHERE id=?", (blob,))
            conn.close()
        return await real_read(fn, on_loop)

    monkeypatch.setattr(store, "_read", racing)
    st = (await store.structures([blob]))[blob]
    assert reads == 2
    assert st["header_size"] == 0 and st["body"]["b"] == 0 and st["env"] == [None] * 10


async def test_sqlite_reanalysis_that_fails_still_serves_fetch(
    store: Store, store_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite only: an old row re-analysed by parsers that raise (planted bugs) gets the minimal structure
    and empty search text, both logged, instead of failing every FETCH of the message."""
    import sqlite3

    from postroom.store import sqlite_append, sqlite_search
    from postroom.store.sqlite import SqliteStore

    assert isinstance(store, SqliteStore)
    mb = await _inbox(store)
    await store.append(MSG, [AppendTarget(mb)])
    blob = (await store.messages(mb))[0].blob_id
    conn = sqlite3.connect(Path(store_url.removeprefix("sqlite:///")) / "meta.db")
    with conn:
        conn.execute("UPDATE blobs SET structure='{\"v\": 1}' WHERE id=?", (blob,))
    conn.close()

    def broken(raw: bytes) -> dict[str, object]:
        raise ValueError("planted")

    monkeypatch.setattr(sqlite_append, "analyze", broken)
    monkeypatch.setattr(sqlite_search, "searchable_text", broken)
    st = (await store.structures([blob]))[blob]
    raw = await store.read(blob)
    assert st["fields"] == [] and st["body"]["h"] + st["body"]["b"] == len(raw)
    assert "not analysed" in caplog.text and "no searchable text" in caplog.text


async def test_sqlite_schema_1_is_migrated(tmp_path: Path) -> None:
    """A store written by the first schema (text inside the structure JSON, contentless index) opens, keeps
    its mail, and finds it by full-text search."""
    import json
    import sqlite3

    directory = tmp_path / "old"
    directory.mkdir()
    conn = sqlite3.connect(directory / "meta.db", isolation_level=None)
    conn.executescript(
        """
        CREATE TABLE meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
        INSERT INTO meta VALUES('schema', 1), ('last_uidvalidity', 5), ('fts_indexed', 1);
        CREATE TABLE accounts(id INTEGER PRIMARY KEY AUTOINCREMENT, address TEXT NOT NULL UNIQUE,
            password_hash TEXT NOT NULL, created REAL NOT NULL);
        INSERT INTO accounts VALUES(1, 'old@example.test', 'x', 0);
        CREATE TABLE mailboxes(id INTEGER PRIMARY KEY AUTOINCREMENT, account_id INTEGER NOT NULL, name TEXT NOT NULL,
            uidvalidity INTEGER NOT NULL, uidnext INTEGER NOT NULL, highestmodseq INTEGER NOT NULL,
            special_use TEXT, subscribed INTEGER NOT NULL DEFAULT 1, UNIQUE(account_id, name));
        INSERT INTO mailboxes VALUES(1, 1, 'INBOX', 5, 2, 2, NULL, 1);
        CREATE TABLE blobs(id INTEGER PRIMARY KEY AUTOINCREMENT, size INTEGER NOT NULL, data BLOB, path TEXT,
            structure TEXT NOT NULL, refs INTEGER NOT NULL);
        CREATE TABLE messages(mailbox_id INTEGER NOT NULL, uid INTEGER NOT NULL, blob_id INTEGER NOT NULL,
            flags TEXT NOT NULL, modseq INTEGER NOT NULL, size INTEGER NOT NULL, internaldate REAL NOT NULL,
            PRIMARY KEY(mailbox_id, uid)) WITHOUT ROWID;
        INSERT INTO messages VALUES(1, 1, 1, '', 2, 10, 0);
        CREATE TABLE fts_pending(blob_id INTEGER PRIMARY KEY);
        CREATE VIRTUAL TABLE fts USING fts5(headers, body, content='', tokenize='trigram');
        """
    )
    old_structure = {"v": 1, "search_headers": "Subject: legacy", "search_body": "an archived statement"}
    conn.execute("INSERT INTO blobs VALUES(1, 10, ?, NULL, ?, 1)", (MSG, json.dumps(old_structure)))
    conn.close()
    store = open_store(f"sqlite:///{directory}")
    await store.open()
    try:
        assert [m.uid for m in await store.messages(1)] == [1]
        assert await store.search_text(1, ["archived"]) == {1}
        assert await store.search_text(1, ["legacy"]) == {1}
        ((_, uid),) = await store.append(MSG, [AppendTarget(1)])
        assert uid == 2
        assert await store.search_text(1, ["contract"]) == {2}  # row 1's text is still the old one …
        st = (await store.structures([1]))[1]  # … until its old structure is analysed again from its bytes
        assert st["v"] > 1 and "search_body" not in st
        assert await store.search_text(1, ["contract"]) == {1, 2}
        assert await store.search_text(1, ["archived"]) == set()
    finally:
        await store.close()


async def test_sqlite_schema_2_is_migrated(tmp_path: Path) -> None:
    """A store of schema 2 (searchable text in ``blobs``, index over it, one blob not yet indexed) opens
    with its text moved to ``blob_text``, a consistent index, and every message found."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'v2'}"
    store = open_store(url)
    await store.open()
    mb = await _inbox(store)
    await store.append(MSG, [AppendTarget(mb)])
    await store.append(b"Subject: later\r\n\r\nnot yet indexed\r\n", [AppendTarget(mb)])
    await store.append(b"Subject: gone\r\n\r\ndeleted before any search\r\n", [AppendTarget(mb)])
    await store.close()
    conn = sqlite3.connect(tmp_path / "v2" / "meta.db", isolation_level=None)
    conn.executescript(
        """
        DROP TABLE fts; DROP TABLE blob_text;
        ALTER TABLE blobs ADD COLUMN search_headers TEXT NOT NULL DEFAULT '';
        ALTER TABLE blobs ADD COLUMN search_body TEXT NOT NULL DEFAULT '';
        UPDATE blobs SET search_headers='contract', search_body='hello contract world' WHERE id=1;
        UPDATE blobs SET search_headers='later', search_body='not yet indexed' WHERE id=2;
        UPDATE blobs SET search_headers='gone', search_body='deleted before any search' WHERE id=3;
        CREATE VIRTUAL TABLE fts USING fts5(search_headers, search_body, content='blobs', content_rowid='id',
            tokenize='trigram');
        INSERT INTO fts(rowid, search_headers, search_body) SELECT id, search_headers, search_body FROM blobs
            WHERE id=1;
        UPDATE meta SET value=1 WHERE key='fts_indexed';
        UPDATE meta SET value=2 WHERE key='schema';
        """
    )
    conn.close()
    store = open_store(url)
    await store.open()
    try:
        await store.delete_messages(mb, [3])  # its moved text goes with it; it was never in the new index
        assert await store.search_text(mb, ["contract"]) == {1}
        assert await store.search_text(mb, ["deleted"]) == set()
        assert await store.search_text(mb, ["indexed"], body_only=True) == {2}
        await store.delete_messages(mb, [1])
        assert await store.search_text(mb, ["contract"]) == set()
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "v2" / "meta.db")
    try:
        assert "search_body" not in {row[1] for row in conn.execute("PRAGMA table_info(blobs)")}
        assert conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == 3
        conn.execute("INSERT INTO fts(fts) VALUES('integrity-check')")  # raises when inconsistent
    finally:
        conn.close()


async def test_reads_of_every_size_agree(store: Store) -> None:
    """Small messages are read on the event loop, larger ones and files on a reader thread: same bytes."""
    mb = await _inbox(store)
    line = b"y" * 998 + b"\r\n"
    bodies = [
        b"Subject: s\r\n\r\nsmall\r\n",
        b"Subject: m\r\n\r\n" + line * 400,  # ~400 KB: stored in the table, read by a reader thread
        b"Subject: l\r\n\r\n" + line * (INLINE_MAX // 1000 + 10),  # a file
    ]
    for raw in bodies:
        await store.append(raw, [AppendTarget(mb)])
    metas = await store.messages(mb)
    for raw, meta in zip(bodies, metas, strict=True):
        assert await store.read(meta.blob_id) == raw
        assert await store.read_range(meta.blob_id, 0, 10) == raw[:10]
        assert await store.read_range(meta.blob_id, len(raw) - 4, 100) == raw[-4:]
        assert await store.read_range(meta.blob_id, len(raw) + 5, 10) == b""
        assert await store.read_range(meta.blob_id, 3, 0) == b""
        assert await store.read_range(meta.blob_id, 12, 50_000) == raw[12:50_012]
    with pytest.raises(NotFoundError):
        await store.read(10_000)
    with pytest.raises(NotFoundError):
        await store.read_range(10_000, 0, 1)


async def test_changes_since_sees_every_commit(store: Store) -> None:
    mb = await _inbox(store)
    empty = await store.changes_since(mb, 0)
    assert empty.exists and not empty.changed and not empty.expunged
    await store.append(MSG, [AppendTarget(mb)])
    await store.append(MSG, [AppendTarget(mb)])
    first = await store.changes_since(mb, empty.highestmodseq)
    assert [m.uid for m in first.changed] == [1, 2] and first.uidnext == 3
    same = await store.changes_since(mb, first.highestmodseq)
    assert not same.changed and not same.expunged and same.highestmodseq == first.highestmodseq
    await store.set_flags(mb, [2], "add", ["\\Deleted"])
    await store.expunge(mb)
    after = await store.changes_since(mb, first.highestmodseq)
    assert after.expunged == [2] and after.highestmodseq > first.highestmodseq
    gone = await store.changes_since(12_345, 0)
    assert not gone.exists


async def test_set_flags_reports_exactly_what_it_stored(store: Store) -> None:
    mb = await _inbox(store)
    for when in (1_700_000_000.123456789, 1_234_567_890.987654321, 1_600_000_000.0):
        await store.append(MSG, [AppendTarget(mb, frozenset({"$A"}), when)])
    before = await store.messages(mb)
    changed, failed = await store.set_flags(mb, [3, 1, 1, 99], "add", ["\\Seen"])
    assert failed == [] and [m.uid for m in changed] == [3, 1]
    after = {m.uid: m for m in await store.messages(mb)}
    assert all(m == after[m.uid] for m in changed)  # internaldate to the last bit, flags, MODSEQ
    assert after[2] == before[1] and after[1].flags == frozenset({"$A", "\\Seen"})
    top = after[1].modseq
    changed, failed = await store.set_flags(mb, [1, 2, 3], "remove", ["$A"], unchanged_since=top - 1)
    assert failed == [1, 3] and [m.uid for m in changed] == [2]
    changed, _ = await store.set_flags(mb, [1, 2, 3], "replace", ["$B"])
    assert {m.uid: m.flags for m in changed} == {u: frozenset({"$B"}) for u in (1, 2, 3)}
    assert [m.flags for m in await store.messages(mb)] == [frozenset({"$B"})] * 3
    assert (await store.set_flags(mb, [1, 2, 3], "add", ["$B"]))[0] == []  # nothing changed: no new MODSEQ
