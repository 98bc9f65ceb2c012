"""Appending messages to the embedded store (mixed into :class:`~postroom.store.sqlite.SqliteStore`).

Invariants:
- One stored copy per append: one ``blobs`` row, referenced by one ``messages`` row per target and by the
  outbound queue when there are remote recipients (``blobs.refs`` counts them), all in one transaction.
- Messages up to ``INLINE_MAX`` octets live in the ``blobs`` table, so the single WAL fsync of the group
  commit makes data and metadata durable together (measured: see ``bench/store_append.py``). Larger ones
  are written to a file, fsynced, renamed and their directory fsynced *before* their row is committed; a
  crash in between leaves at worst an orphan file, never a row without bytes.
- The message is analysed (``mime.analyze``: what FETCH needs) before its job runs, unless the caller
  defers that (``analyze=False``: SMTP delivery). A deferred message's row holds :data:`PENDING_STRUCTURE`,
  whose version is below every real one, so the first ``structures`` call that asks for it analyses it and
  keeps the result, as for a row of an older analyser (measured: ``docs/benchmarks.md``, SMTP).
- If analysis raises (a bug), the message is stored with ``mime.minimal_structure`` and the error logged,
  never refused (:func:`structure_of`). Up to ``LOOP_ANALYZE_MAX`` octets analysis happens at once on the
  event loop (~20 µs for 5 KB): the loop and the writer thread share one GIL, so analysing on the writer
  gained no parallelism and cost a GIL hand-off per message (SMTP, one worker, A/B interleaved:
  1,785-1,813 → 2,023-2,118 msg/s, the writer thread's CPU 180 → 100 µs per message, the loop's
  unchanged). Larger messages are analysed by the job's ``prepare`` on the writer thread, before the write
  lock is taken, so the loop never stalls on one.
- Appends are bulk jobs of the group-commit writer (:mod:`postroom.store.sqlite_db`): the appends of one
  batch take one multi-row ``INSERT`` per table. Their blob ids are taken from ``sqlite_sequence`` inside the
  write transaction, which ``BEGIN IMMEDIATE`` makes the only writer, so ids still only grow and are never
  reused (what AUTOINCREMENT promises, and the full-text indexer relies on).
- Each target mailbox's ``uidnext``/``highestmodseq`` is advanced once per bulk call, by one ``UPDATE …
  RETURNING`` at its start; every message still gets its own UID and MODSEQ, in order: the same rows as
  appending one by one (which is how a job runs alone, on the writer's savepoint path).
- A batch of appends of messages in rows (no file, no outbound copy) is first offered to the native
  commit (:mod:`postroom.store.sqlite_native`, when built): the same statements and the same rows, run
  without the GIL. Anything it cannot take, or any failure before its COMMIT, runs on the Python path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from postroom.errors import NotFoundError, StoreError, StoreFullError
from postroom.mime import analyze, minimal_structure
from postroom.store import sqlite_db as db
from postroom.store.api import AppendTarget, OutboundEnvelope
from postroom.store.sqlite_native import RESERVE, FastCommitError, NativeCommit

log = logging.getLogger(__name__)

INLINE_MAX = 1024 * 1024  # octets; larger messages go to files under blobs/


def structure_of(raw: bytes) -> dict[str, Any]:
    """``analyze(raw)``; should it raise (a bug: it is meant to be total), the message is still stored, with
    ``minimal_structure`` and the error logged. Refusing it would make an MX answer 451 to every retry of
    the sender, and the mail would never arrive."""
    try:
        return analyze(raw)
    except Exception:
        log.exception("message of %d octets not analysed: stored with a minimal structure", len(raw))
        return minimal_structure(raw)


#: The stored structure of a message appended with ``analyze=False``: not analysed yet, a version below
#: every analyser's.
PENDING_VERSION = -1
PENDING_STRUCTURE = orjson.dumps({"v": PENDING_VERSION}).decode()


def flag_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(set(flags)))


@dataclass(slots=True)
class _Append:
    """One append as the writer sees it: ``structure`` is filled in by ``prepare`` (on the event loop for
    messages up to ``LOOP_ANALYZE_MAX``, else on the writer thread)."""

    raw: bytes
    path: str | None  # the message's file under blobs/, or None: the bytes go in the row
    targets: Sequence[AppendTarget]
    outbound: OutboundEnvelope | None
    structure: str = ""

    def prepare(self) -> None:
        self.structure = orjson.dumps(structure_of(self.raw)).decode()


LOOP_ANALYZE_MAX = 64 * 1024  # octets of a message analysed on the event loop; larger: on the writer thread
ROWS_PER_INSERT = 64  # rows per multi-row INSERT: 64 * 7 host parameters, far below SQLite's 32,766


def _insert_rows(c: sqlite3.Connection, head: str, rows: list[tuple[Any, ...]]) -> None:
    """``head`` + ``VALUES`` for all ``rows`` in as few statements as possible: each statement is one
    ``sqlite3_step``, so the writer thread gives up and takes back the GIL once per statement, not once per
    row as ``executemany`` does (each hand-off costs the event loop thread a futex round trip)."""
    if not rows:
        return
    one = "(" + ",".join("?" * len(rows[0])) + ")"
    for i in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[i : i + ROWS_PER_INSERT]
        c.execute(head + ",".join([one] * len(chunk)), [v for row in chunk for v in row])


class AppendMixin:
    """``append`` and the blob files behind it."""

    if TYPE_CHECKING:  # provided by SqliteStore
        blob_dir: Path
        _writer: db.GroupCommitWriter | None
        _native: NativeCommit | None

        def _enqueue_tx(self, c: sqlite3.Connection, blob_id: int, env: OutboundEnvelope, now: float) -> int: ...

    async def append(
        self,
        raw: bytes,
        targets: Sequence[AppendTarget],
        outbound: OutboundEnvelope | None = None,
        analyze: bool = True,
    ) -> list[tuple[int, int]]:
        if not targets and (outbound is None or not outbound.recipients):
            return []
        writer = self._writer
        assert writer is not None, "store is not open"
        path: str | None = None
        if len(raw) > INLINE_MAX:
            path = await asyncio.to_thread(self._write_blob_file, raw)
        job = _Append(raw, path, targets, outbound)
        many = self._append_many

        def one(c: sqlite3.Connection, t: db.Touched) -> list[tuple[int, int]]:
            result: list[tuple[int, int]] = many(c, [job], t)[0]
            return result

        prepare: Callable[[], None] | None = job.prepare
        if not analyze:
            job.structure = PENDING_STRUCTURE
            prepare = None
        elif len(raw) <= LOOP_ANALYZE_MAX:
            job.prepare()  # here, on the event loop: see the module invariants
            prepare = None
        try:
            result: list[tuple[int, int]] = await writer.submit(one, prepare, many, job)
        except BaseException:
            if path is not None:
                await asyncio.to_thread(self._remove_blob_file, path)
            raise
        return result

    def _append_many(self, c: sqlite3.Connection, jobs: list[_Append], t: db.Touched) -> list[Any]:
        """The writer's bulk job: store ``jobs`` in order; per job, its ``(mailbox id, uid)`` list."""
        counters, last_blob = self._reserve_uids(c, jobs)  # mailbox id -> [next uid, highest modseq so far]
        next_blob = last_blob + 1
        blob_rows: list[tuple[Any, ...]] = []
        message_rows: list[tuple[Any, ...]] = []
        queued: list[tuple[int, OutboundEnvelope]] = []
        results: list[list[tuple[int, int]]] = []
        now = time.time()
        for job in jobs:
            blob_id = next_blob
            next_blob += 1
            remote = job.outbound is not None and bool(job.outbound.recipients)
            size = len(job.raw)
            blob_rows.append(
                (blob_id, size, None if job.path else job.raw, job.path, job.structure, len(job.targets) + remote)
            )
            placed: list[tuple[int, int]] = []
            for target in job.targets:
                mailbox_id = target.mailbox_id
                counter = counters[mailbox_id]
                uid = counter[0]
                counter[0] = uid + 1
                counter[1] += 1
                date = target.internaldate if target.internaldate is not None else now
                message_rows.append((mailbox_id, uid, blob_id, flag_text(target.flags), counter[1], size, date))
                placed.append((mailbox_id, uid))
            if remote:
                assert job.outbound is not None
                queued.append((blob_id, job.outbound))
            results.append(placed)
        _insert_rows(c, "INSERT INTO blobs(id, size, data, path, structure, refs) VALUES", blob_rows)
        _insert_rows(c, "INSERT INTO messages VALUES", message_rows)
        t.mailboxes.update(counters)
        for blob_id, env in queued:
            self._enqueue_tx(c, blob_id, env, now)
        if queued:
            t.mailboxes.add(0)
        return results

    def _append_native(
        self, jobs: list[_Append], lock_fd: int, wal_fd: int
    ) -> tuple[list[Any], db.Touched, int] | None:
        """The writer's fast version of :meth:`_append_many` (see the module invariants): committed and
        synced without the GIL, or None (declined, nothing committed)."""
        native = self._native
        assert native is not None, "the writer is given this fast version only with a native commit"
        blobs: list[tuple[bytes, str, int]] = []
        rows: list[tuple[int, int, str, float]] = []
        now = time.time()
        for i, job in enumerate(jobs):
            if job.path is not None or (job.outbound is not None and job.outbound.recipients) or not job.targets:
                return None
            blobs.append((job.raw, job.structure, len(job.targets)))
            for target in job.targets:
                date = target.internaldate if target.internaldate is not None else now
                rows.append((i, target.mailbox_id, flag_text(target.flags), date))
        try:
            uids, sync_errno = native.append(lock_fd, wal_fd, blobs, rows)
        except FastCommitError as exc:
            log.debug("native commit declined: %s", exc)
            return None
        results: list[Any] = []
        placed = iter(zip(rows, uids, strict=True))
        for job in jobs:
            results.append([(row[1], uid) for row, uid in itertools.islice(placed, len(job.targets))])
        return results, db.Touched(mailboxes={row[1] for row in rows}), sync_errno

    @staticmethod
    def _reserve_uids(c: sqlite3.Connection, jobs: list[_Append]) -> tuple[dict[int, list[int]], int]:
        """Advance each target mailbox's UIDNEXT and HIGHESTMODSEQ by its number of new messages, in one
        ``UPDATE … RETURNING`` per mailbox that also gives the values before (so the bulk job costs no
        separate read and write of the counters: every statement hands the GIL to the event loop and
        back). Also the last blob id, which the first of them reads too."""
        counts: dict[int, int] = {}
        for job in jobs:
            for target in job.targets:
                counts[target.mailbox_id] = counts.get(target.mailbox_id, 0) + 1
        counters: dict[int, list[int]] = {}
        seq: int | None = None
        for mailbox_id, n in counts.items():
            rows = c.execute(RESERVE, (n, mailbox_id)).fetchall()
            if not rows:
                raise NotFoundError(f"no mailbox {mailbox_id}")
            uidnext, modseq, last_blob = rows[0]
            counters[mailbox_id] = [uidnext, modseq]
            if seq is None:
                seq = last_blob or 0
        if seq is None:  # only queued copies: no mailbox statement to ride on
            row = c.execute("SELECT seq FROM sqlite_sequence WHERE name='blobs'").fetchone()
            seq = row[0] if row is not None else 0
        return counters, seq

    def _write_blob_file(self, raw: bytes) -> str:
        name = os.urandom(12).hex()
        sub = self.blob_dir / name[:2]
        rel = f"{name[:2]}/{name}"
        try:
            new_dir = not sub.exists()
            sub.mkdir(exist_ok=True)
            if new_dir:
                db.fsync_dir(self.blob_dir)
            tmp = sub / (name + ".tmp")
            with open(tmp, "wb") as fh:
                fh.write(raw)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, sub / name)
            db.fsync_dir(sub)
        except OSError as exc:
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise StoreFullError(f"disk full: {exc.strerror}") from None
            raise StoreError(f"cannot write message file: {exc.strerror}") from None
        return rel

    def _remove_blob_file(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.blob_dir / rel)
