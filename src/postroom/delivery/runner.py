"""The queue runner: takes due entries from the store's outbound queue and delivers them.

Invariants:
- The store is the only state that matters: an entry is marked delivered/deferred/failed with
  ``queue_update`` only after the attempt ended, so a crash mid-attempt leaves it queued (claimed entries
  come back when the store's claim lapses) and at worst delivers twice, never loses it.
- Entries of the same message and recipient domain that are due together go in one transaction (up to
  ``max_recipients`` per transaction, RFC 5321 §4.5.3.1.8).
- 4xx and connection failures are retried on ``retry_schedule`` (the n-th deferral waits the n-th value,
  the last one repeating) until ``max_queue_age``; then, like a 5xx at once, the recipient fails.
- A failure, a delay (only when NOTIFY asked for DELAY) or a success notice (NOTIFY=SUCCESS and the peer does
  not speak DSN, RFC 3461 §6.2.2) produces one RFC 3464 report per message and attempt, to the envelope
  sender: into its INBOX when the sender is local, else queued with the null sender. Never to ``<>``.
- The runner wakes on the store's queue watch (something queued or made due, also from another process),
  on the earliest retry it scheduled itself, and every ``poll_interval`` seconds at the latest.
- :meth:`stop` cancels in-flight attempts; CancelledError is never swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable

from postroom.app import App
from postroom.delivery import dsn
from postroom.delivery.client import Rcpt
from postroom.delivery.dkimsign import DkimSigner
from postroom.delivery.outbound import Outbound, Outcome
from postroom.delivery.routing import DnsLookup, Lookup
from postroom.delivery.smarthost import parse as parse_smarthost
from postroom.errors import StoreError
from postroom.store.api import AppendTarget, OutboundEnvelope, OutboundRecipient, QueueEntry

log = logging.getLogger(__name__)

EXPIRED = "4.4.7"  # RFC 3463: delivery time expired


def strip_return_path(raw: bytes) -> bytes:
    """Drop leading ``Return-Path:`` fields (with their folded lines) before relaying.

    RFC 5321 §4.4: the final delivery MTA adds Return-Path; a relay must not pass one on. The SMTP server
    adds it to the stored copy when a transaction has local recipients, and the queued copy shares those
    bytes.
    """
    while raw[:12].lower() == b"return-path:":
        end = raw.find(b"\r\n")
        while end >= 0 and raw[end + 2 : end + 3] in (b" ", b"\t"):
            end = raw.find(b"\r\n", end + 2)
        if end < 0:
            return raw
        raw = raw[end + 2 :]
    return raw


def retry_delay(schedule: tuple[float, ...], attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based); the last value repeats."""
    if not schedule:
        return 300.0
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


class QueueRunner:
    """Started by ``postroom serve``: ``await runner.start()`` … ``await runner.stop()``."""

    def __init__(self, app: App, *, lookup: Lookup | None = None, clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.store = app.store
        self.cfg = app.config.delivery
        self.clock = clock
        signer = None
        if self.cfg.dkim:  # app.config is read at each message: serve refreshes its domains
            signer = DkimSigner(app.config.data_path, self.cfg.dkim_selector, self._is_local)
        smarthost = parse_smarthost(self.cfg.smarthost, self.cfg.smarthost_password_file)
        self.outbound = Outbound(
            self.cfg,
            app.hostname,
            lookup or DnsLookup(self.cfg.nameservers, lifetime=min(30.0, self.cfg.command_timeout)),
            smarthost,
            signer,
        )
        self._task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._inflight: set[int] = set()
        self._next_due = float("inf")
        self._job_done = asyncio.Event()
        self.delivered = 0  # counters for logs and benchmarks
        self.deferred = 0
        self.failed = 0

    def _is_local(self, domain: str) -> bool:
        return self.app.config.is_local_domain(domain)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="queue-runner")

    async def stop(self) -> None:
        """Cancel the loop and in-flight attempts; their entries are made due again at once (instead of
        waiting for the store's claim to lapse), so a restart picks them up. At worst one is sent twice."""
        task, self._task = self._task, None
        jobs = list(self._jobs)
        interrupted = sorted(self._inflight)
        for t in ([task] if task else []) + jobs:
            t.cancel()
        for t in ([task] if task else []) + jobs:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if interrupted:
            try:
                await self.store.queue_retry(interrupted)
            except StoreError as exc:
                log.warning("could not release %d interrupted queue entries: %s", len(interrupted), exc)
        await self.outbound.close()

    async def run_once(self) -> int:
        """Deliver everything due now and wait for it (tests, ``postroom queue flush``). Returns entries tried."""
        total = 0
        while True:
            n = await self._dispatch()
            total += n
            if self._jobs:
                await asyncio.gather(*list(self._jobs), return_exceptions=True)
            if n == 0:
                return total

    # -- the loop -------------------------------------------------------------------------------
    async def _loop(self) -> None:
        watch = self.store.queue_watch()
        try:
            while True:
                watch.clear()
                claimed = await self._dispatch()
                await self.outbound.reap()
                if claimed and self._room() > 0:
                    continue
                wait_for = self.cfg.poll_interval
                if self._next_due != float("inf"):
                    wait_for = max(0.0, min(wait_for, self._next_due - self.clock()))
                if self.outbound.has_idle():
                    wait_for = min(wait_for, self.cfg.connection_idle)
                self._job_done.clear()
                waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(watch.wait())]
                if self._room() <= 0:
                    waiters.append(asyncio.ensure_future(self._job_done.wait()))
                try:
                    await asyncio.wait(waiters, timeout=wait_for, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
                if self._next_due <= self.clock():
                    self._next_due = float("inf")
        finally:
            watch.close()

    def _room(self) -> int:
        return self.cfg.max_connections * 4 - len(self._jobs)

    async def _dispatch(self) -> int:
        """Claim due entries and start one job per (message, domain). Returns how many were claimed."""
        room = self._room()
        if room <= 0:
            return 0
        entries = await self.store.queue_due(self.clock(), limit=min(self.cfg.claim_batch, room * 4))
        fresh = [e for e in entries if e.id not in self._inflight]
        groups: dict[tuple[int, str], list[QueueEntry]] = defaultdict(list)
        for e in fresh:
            groups[(e.message_id, e.domain.lower())].append(e)
            self._inflight.add(e.id)
        for group in groups.values():
            task = asyncio.get_running_loop().create_task(self._job(group))
            self._jobs.add(task)
            task.add_done_callback(self._finished)
        return len(fresh)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        self._job_done.set()

    async def _job(self, entries: list[QueueEntry]) -> None:
        try:
            first = entries[0]
            try:
                raw = strip_return_path(await self.store.read_queued(first.message_id))
            except StoreError as exc:
                log.error("queued message %d unreadable: %s", first.message_id, exc)
                bad = Outcome("deferred", f"451 4.3.0 queued message unreadable: {exc}", "4.3.0")
                await self._record(entries, [bad] * len(entries), b"")
                return
            step = max(1, self.cfg.max_recipients)
            for start in range(0, len(entries), step):
                chunk = entries[start : start + step]
                try:
                    outcomes = await self.outbound.deliver(
                        first.domain,
                        first.sender,
                        [Rcpt(e.recipient, e.notify, e.orcpt) for e in chunk],
                        raw,
                        ret=first.ret,
                        envid=first.envid,
                    )
                except Exception:
                    log.exception("delivery attempt of message %d failed unexpectedly", first.message_id)
                    outcomes = [Outcome("deferred", "451 4.3.0 internal error, will retry", "4.3.0")] * len(chunk)
                await self._record(chunk, outcomes, raw)
        finally:
            for e in entries:
                self._inflight.discard(e.id)

    # -- outcomes -------------------------------------------------------------------------------
    async def _record(self, entries: list[QueueEntry], outcomes: list[Outcome], raw: bytes) -> None:
        now = self.clock()
        notices: list[dsn.RecipientStatus] = []
        for e, o in zip(entries, outcomes, strict=True):
            status = o.status
            enhanced = o.enhanced
            if status == "deferred" and now - e.created >= self.cfg.max_queue_age:
                status, enhanced = "failed", o.enhanced if o.enhanced.startswith("4.") else EXPIRED
            if status == "deferred":
                nxt = now + retry_delay(self.cfg.retry_schedule, e.attempts + 1)
                self._next_due = min(self._next_due, nxt)
                await self.store.queue_update(e.id, "deferred", o.reply, nxt)
                self.deferred += 1
                log.info("deferred id=%d to=<%s> relay=%s: %s", e.id, e.recipient, o.remote or "-", o.reply)
                if e.attempts == 0 and dsn.wants_dsn(e.sender, e.notify, "delayed"):
                    notices.append(self._status(e, o, "delayed", enhanced, now, e.created + self.cfg.max_queue_age))
            elif status == "delivered":
                await self.store.queue_update(e.id, "delivered", o.reply)
                self.delivered += 1
                log.info("delivered id=%d to=<%s> relay=%s: %s", e.id, e.recipient, o.remote, o.reply)
                if not o.peer_dsn and self.cfg.success_notices and dsn.wants_dsn(e.sender, e.notify, "relayed"):
                    notices.append(self._status(e, o, "relayed", enhanced, now))
            else:
                await self.store.queue_update(e.id, "failed", o.reply)
                self.failed += 1
                log.info("failed id=%d to=<%s> relay=%s: %s", e.id, e.recipient, o.remote or "-", o.reply)
                if dsn.wants_dsn(e.sender, e.notify, "failed"):
                    notices.append(self._status(e, o, "failed", enhanced, now))
        if notices and raw:
            first = entries[0]
            report = dsn.compose(
                reporting_mta=self.app.hostname,
                sender=first.sender,
                original=raw,
                statuses=notices,
                arrival=first.created,
                now=now,
                ret=first.ret,
                envid=first.envid,
            )
            await self.send_report(first.sender, report, eight_bit=not report.isascii())

    @staticmethod
    def _status(
        e: QueueEntry, o: Outcome, action: dsn.Action, enhanced: str, now: float, until: float = 0.0
    ) -> dsn.RecipientStatus:
        return dsn.RecipientStatus(
            recipient=e.recipient,
            action=action,
            status=enhanced or ("2.0.0" if action == "relayed" else "5.0.0"),
            diagnostic=o.reply if o.remote else "",  # an SMTP reply (RFC 3464 §2.3.6 "smtp;")
            reason="" if o.remote else o.reply,  # our own finding (DNS, connection, address check)
            remote_mta=o.remote,
            orcpt=e.orcpt,
            last_attempt=now,
            will_retry_until=until,
        )

    async def send_report(self, sender: str, report: bytes, *, eight_bit: bool = False) -> None:
        """Hand a DSN to ``sender``: its INBOX when local, else the queue with ``MAIL FROM:<>``."""
        if not sender:
            return  # RFC 5321 §4.5.5: never report on a report
        domain = sender.rpartition("@")[2]
        if self.app.config.is_local_domain(domain):
            account = await self.store.resolve(sender)
            if account is None:
                log.warning("DSN for unknown local sender <%s> dropped", sender)
                return
            inbox = await self.store.get_mailbox(account.id, "INBOX")
            if inbox is None:
                log.warning("DSN for <%s> dropped: no INBOX", sender)
                return
            await self.store.append(report, [AppendTarget(inbox.id)])
        else:
            envelope = OutboundEnvelope(sender="", recipients=(OutboundRecipient(sender),), eight_bit=eight_bit)
            await self.store.append(report, [], outbound=envelope)
        log.info("DSN sent to <%s>", sender)
