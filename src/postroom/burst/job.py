"""One burst job from report to report: check, scan, plan, pre-flight, split + compose, deliver, report.

Invariants:
- Nothing is delivered (no connection, no file in ``--to-eml``, no draft) until the whole plan is clean
  and every message rendered: the pre-flight catches tag, address, template and variable errors first.
  With ``skip_invalid`` the invalid messages are dropped and listed instead.
- Before the first real send, the same connection check as ``--check`` runs; a failure is explained and
  nothing is sent.
- Every SMTP and drafts delivery goes through the ledger (``ledger.sqlite`` in the output directory); see
  :mod:`postroom.burst.ledger` for the no-duplicate guarantee.
- The exit code is 0 only when every planned message is delivered (or was delivered by an earlier run).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import getpass
import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import TextIO

from postroom.burst import pdf as pdfmod
from postroom.burst.check import check, explain
from postroom.burst.compose import Rendered, RenderError, render, stable_message_id
from postroom.burst.handoff import DraftsWriter, HandoffError, parse_drafts_url, write_eml
from postroom.burst.jobconfig import JobConfig, default_job, load_job
from postroom.burst.ledger import RESENDABLE, Ledger, LedgerWriter, Row
from postroom.burst.plan import Plan, PlannedMessage, Problem, make_plan
from postroom.burst.produce import Built, Item, produce
from postroom.burst.report import ProgressView, write_reports
from postroom.burst.transport import (
    Envelope,
    Outcome,
    Sender,
    SessionError,
    Transport,
    Work,
    open_session,
    parse_transport,
)
from postroom.errors import ConfigError
from postroom.net import eventloop
from postroom.wire.address import AddressError, parse_mailbox

FETCH_BATCH = 16  # built messages taken from the producer per thread hop
# Messages marked "sending" ahead of their turn: a durable commit takes milliseconds (one fsync), so
# marking each message only when its connection is ready caps a burst at concurrency / commit time
# (~1,500 msg/s with 4 connections and a 2.8 ms fsync). A commit also waits for the GIL behind a busy
# sending loop: with 64 ahead ~10% of messages still waited for their mark at ~9,000 msg/s, with 128 ~5%
# (bench/burst.py --sending-only, interleaved: median 7,769 -> 8,409 msg/s). The price: after an OS crash
# (not a kill: the send log covers that) up to LOOKAHEAD + concurrency messages are "unknown".
LOOKAHEAD = 128
DAY = 86400.0  # seconds: providers' daily limits are rolling 24 hours

EXIT_OK = 0
EXIT_FAILED = 1  # something was not delivered, or the pre-flight found errors
EXIT_INPUT = 2  # the report, the config or the command line is unusable
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


@dataclass
class Options:
    """Everything the CLI passes in."""

    pdf: Path
    config: Path | None = None
    out: Path | None = None
    dry_run: bool = False
    to_eml: Path | None = None
    to_drafts: str | None = None
    transport: str | None = None
    preset: str | None = None
    user: str | None = None
    check_only: bool = False
    test_to: str | None = None
    skip_invalid: bool = False
    resend_unknown: bool = False
    retry_failed: bool = False
    workers: int | None = None
    fancy: bool | None = None
    max_attempts: int | None = None
    backoff: float | None = None
    connect_timeout: float | None = None
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    password_prompt: Callable[[str], str] = getpass.getpass


def _say(opts: Options, text: str) -> None:
    print(text, file=opts.stream, flush=True)


def _password(opts: Options, env: str, what: str, *fallback_env: str) -> str:
    for name in (env, *fallback_env):
        if os.environ.get(name):
            return os.environ[name]
    return opts.password_prompt(f"{what}: ")


def output_dir(opts: Options) -> Path:
    return opts.out or opts.pdf.with_name(opts.pdf.stem + ".burst")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def preflight(job: JobConfig, plan: Plan, source: str) -> tuple[Plan, dict[str, Rendered]]:
    """Render every valid message; rendering errors become problems on the message's first page."""
    rendered: dict[str, Rendered] = {}
    extra: list[Problem] = []
    bad: set[str] = set()
    for m in plan.messages:
        if m.invalid:
            continue
        try:
            rendered[m.key] = render(job, m, source)
        except RenderError as exc:
            extra.append(Problem(m.pages[0], "error", str(exc)))
            bad.add(m.key)
    return plan.with_problems(extra, bad), rendered


def _write_plan(out: Path, plan: Plan, rendered: dict[str, Rendered]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "pages": plan.page_count,
        "unsent_pages": list(plan.unsent_pages),
        "problems": [{"page": p.page, "severity": p.severity, "text": p.text} for p in plan.problems],
        "messages": [
            {
                "seq": m.seq,
                "key": m.key,
                "to": list(m.tag.to),
                "cc": list(m.tag.cc),
                "bcc": list(m.tag.bcc),
                "pages": list(m.pages),
                "template": m.template,
                "invalid": m.invalid,
                "subject": rendered[m.key].subject if m.key in rendered else None,
                "filename": rendered[m.key].filename if m.key in rendered else None,
            }
            for m in plan.messages
        ],
    }
    (out / "plan.json").write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    lines = [str(p) for p in plan.problems] or ["no problems"]
    (out / "preflight.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "preflight.txt"


def run_job(opts: Options) -> int:
    """Run the job; returns the exit code. Errors in the input are printed, never raised."""
    try:
        return _run(opts)
    except (ConfigError, pdfmod.PdfInputError, HandoffError) as exc:
        _say(opts, f"error: {exc}")
        return EXIT_INPUT
    except KeyboardInterrupt:
        _say(opts, "interrupted: run the same command again to send the rest (the ledger knows what was sent)")
        return EXIT_INTERRUPTED


def _run(opts: Options) -> int:
    job = load_job(opts.config) if opts.config else default_job()
    transport: Transport | None = None
    if opts.check_only or not (opts.dry_run or opts.to_eml or opts.to_drafts):
        transport = parse_transport(opts.transport, opts.preset, opts.user)
    if opts.check_only:
        assert transport is not None
        pw = (
            _password(opts, "POSTROOM_SMTP_PASSWORD", f"SMTP password for {transport.user}") if transport.user else None
        )
        result = asyncio.run(check(transport, pw, timeout=opts.connect_timeout or 15.0))
        _say(opts, str(result))
        return EXIT_OK if result.ok else EXIT_FAILED
    if opts.test_to:
        try:
            opts.test_to = str(parse_mailbox(opts.test_to, smtputf8=True))
        except AddressError as exc:
            raise ConfigError(f"--test-to {opts.test_to!r}: {exc}") from None

    pdf_password = os.environ.get("POSTROOM_PDF_PASSWORD") or None
    page_count = pdfmod.check_pdf(opts.pdf, pdf_password)
    workers = opts.workers or pdfmod.default_workers()
    if workers > 1 and page_count > pdfmod.IN_PROCESS_PAGES:
        pdfmod.pool(workers)  # before the progress display or the sender start threads: workers can fork
    with ProgressView("scanning pages", page_count, fancy=opts.fancy) as pv:
        scans = pdfmod.scan(opts.pdf, page_count, password=pdf_password, workers=opts.workers, progress=pv.update)
    # Provider limits apply to the plan even when only writing .eml files for that provider.
    if transport is not None:
        limits = transport.limits
    elif opts.transport or opts.preset:
        limits = parse_transport(opts.transport, opts.preset, opts.user).limits
    else:
        limits = None
    plan = make_plan(
        scans,
        group=job.group,
        untagged=job.untagged,
        templates=job.templates.keys(),
        max_recipients=limits.recipients_per_message if limits else None,
    )
    plan, rendered = preflight(job, plan, opts.pdf.stem)
    sender = _envelope_sender(job, rendered, transport)
    if sender:  # no 'from' in the config: the login name is the From as well as the envelope sender
        rendered = {k: r if r.sender else dataclasses.replace(r, sender=sender) for k, r in rendered.items()}
    out = output_dir(opts)
    report_path = _write_plan(out, plan, rendered)
    for p in plan.problems:
        _say(opts, f"{opts.pdf.name}: {p}")
    _say(opts, f"{opts.pdf.name}: {page_count} pages, {len(plan.messages)} messages planned; plan in {report_path}")
    if plan.errors:
        if not opts.skip_invalid:
            _say(
                opts,
                f"not sending: {len(plan.errors)} error(s) in the pre-flight (use --skip-invalid to send the rest)",
            )
            return EXIT_FAILED
        plan = plan.without_invalid()
    if not plan.messages:
        _say(opts, "nothing to send")
        return EXIT_FAILED
    if transport is not None and not sender:
        _say(opts, f"error: no sender: set 'from' in {job.source}")
        return EXIT_INPUT

    pdf_sha = _sha256_file(opts.pdf)
    job_id = f"test:{opts.test_to}:{pdf_sha}" if opts.test_to else pdf_sha
    items = [
        Item(m, rendered[m.key], stable_message_id(job_id, m.key, rendered[m.key].sender or sender), opts.test_to)
        for m in plan.messages
    ]
    if opts.dry_run or opts.to_eml:
        directory = opts.to_eml or (out / "eml")
        return _write_all(opts, job, pdf_password, items, directory, plan)
    # The servers' loop (uvloop by default): ~12 % less CPU per message in the send loop, measured.
    return eventloop.run(_deliver(opts, job, pdf_password, items, plan, transport, sender, job_id, out))


@functools.lru_cache(maxsize=64)
def _address_of(mailbox: str) -> str:
    """The bare address of ``Name <addr>`` (cached: a job has one or a few senders)."""
    return parseaddr(mailbox)[1]


def _envelope_sender(job: JobConfig, rendered: dict[str, Rendered], t: Transport | None) -> str:
    for r in rendered.values():
        if r.sender:
            return parseaddr(r.sender)[1]
    if job.sender:
        return parseaddr(job.sender)[1]
    if t is not None and t.user and "@" in t.user:
        return t.user
    return ""


def _write_all(
    opts: Options, job: JobConfig, pdf_password: str | None, items: list[Item], directory: Path, plan: Plan
) -> int:
    with ProgressView("writing .eml", len(items), fancy=opts.fancy) as pv:
        for n, built in enumerate(produce(opts.pdf, pdf_password, job, items, workers=opts.workers), 1):
            it = items[n - 1]
            write_eml(directory, it.msg.seq, it.msg.tag.to[0], built.data)
            pv.update(n)
    _say(opts, f"wrote {len(items)} .eml file(s) to {directory}" + (" (dry run: nothing sent)" if opts.dry_run else ""))
    return EXIT_OK


async def _deliver(
    opts: Options,
    job: JobConfig,
    pdf_password: str | None,
    items: list[Item],
    plan: Plan,
    transport: Transport | None,
    sender: str,
    job_id: str,
    out: Path,
) -> int:
    ledger = Ledger(out / "ledger.sqlite")
    try:
        rows = ledger.prepare(job_id, plan.messages, resend_unknown=opts.resend_unknown, retry_failed=opts.retry_failed)
        todo = [it for it in items if rows[it.msg.key].status in RESENDABLE]
        held = [r for r in rows.values() if r.status == "unknown"]
        for r in held:
            _say(
                opts,
                f"held back: message {r.seq} to {', '.join(r.recipients)} may have been accepted by an "
                "earlier run that was interrupted; check, then re-run with --resend-unknown if it was not",
            )
        if transport is not None:
            todo, note = daily_allowance(ledger, transport, todo)
            if note:
                _say(opts, note)
        if todo:
            if transport is not None:
                code = await _send_smtp(opts, job, pdf_password, todo, transport, sender, ledger, job_id)
            else:
                assert opts.to_drafts is not None
                code = await _send_drafts(opts, job, pdf_password, todo, ledger, job_id)
            if code != EXIT_OK:
                return code
        final = ledger.rows(job_id)
    finally:
        ledger.close()
    keys = {m.key for m in plan.messages}
    final = [r for r in final if r.key in keys]
    _, html_path = write_reports(out, final, title=f"Burst report: {opts.pdf.name}")
    counts: dict[str, int] = {}
    for r in final:
        counts[r.status] = counts.get(r.status, 0) + 1
    _say(opts, "result: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; report {html_path}")
    ok = all(r.status in ("sent", "skipped") for r in final)
    return EXIT_OK if ok else EXIT_FAILED


def daily_allowance(ledger: Ledger, t: Transport, todo: list[Item]) -> tuple[list[Item], str]:
    """The messages the provider's daily limits still allow (counting what the ledger sent in 24 h)."""
    lim = t.limits
    if lim.messages_per_day is None and lim.recipients_per_day is None:
        return todo, ""
    msgs, rcpts = ledger.sent_since(time.time() - DAY)
    allowed: list[Item] = []
    for it in todo:
        n = len(it.msg.tag.recipients) if it.to_override is None else 1
        if lim.messages_per_day is not None and msgs + 1 > lim.messages_per_day:
            break
        if lim.recipients_per_day is not None and rcpts + n > lim.recipients_per_day:
            break
        msgs, rcpts = msgs + 1, rcpts + n
        allowed.append(it)
    if len(allowed) < len(todo):
        return allowed, (
            f"{t.preset or t.host}'s daily limit allows {len(allowed)} of {len(todo)} messages now; "
            "re-run the same command tomorrow to send the rest"
        )
    return todo, ""


async def _send_smtp(
    opts: Options,
    job: JobConfig,
    pdf_password: str | None,
    todo: list[Item],
    t: Transport,
    sender: str,
    ledger: Ledger,
    job_id: str,
) -> int:
    password = _password(opts, "POSTROOM_SMTP_PASSWORD", f"SMTP password for {t.user}") if t.user else None
    # The same check as --check, before anything is sent.
    try:
        client = await open_session(t, password, timeout=opts.connect_timeout or 15.0)
        await client.quit()
    except SessionError as err:
        _say(opts, f"connection check failed: {t} ({err.stage}: {err.detail})\n{explain(err, t)}\nnothing was sent")
        return EXIT_FAILED
    kwargs: dict[str, float | int] = {}
    if opts.max_attempts is not None:
        kwargs["max_attempts"] = opts.max_attempts
    if opts.backoff is not None:
        kwargs["backoff_base"] = opts.backoff
    snd = Sender(t, password, **kwargs)  # type: ignore[arg-type]
    by_key = {it.msg.key: it for it in todo}
    source = produce(opts.pdf, pdf_password, job, todo, workers=opts.workers, for_smtp=True)
    try:
        async with LedgerWriter(ledger, job_id) as lw:
            with ProgressView("sending", len(todo), fancy=opts.fancy) as pv:
                await send_built(snd, source, by_key, sender, lw, pv.update)
    finally:
        await snd.close()
    return EXIT_OK


class _Ahead:
    """The messages marked ``sending`` ahead of their turn: at most ``size``, refilled in bulk.

    The feeder tops the buffer up whenever it has fallen to three quarters (not after every message), so
    it wakes once per ``size // 4`` messages and their marks share commits; the senders ``pop`` (never
    waiting) or ``take`` (waiting for a message or the end)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: collections.deque[tuple[Built, asyncio.Future[None]]] = collections.deque()
        self.ended = False
        self._room = asyncio.Event()
        self._ready = asyncio.Event()

    def wants_more(self) -> bool:
        return len(self.items) < self.size

    def put(self, built: Built, marked: asyncio.Future[None]) -> None:
        self.items.append((built, marked))
        self._ready.set()

    def end(self) -> None:
        self.ended = True
        self._ready.set()

    async def room(self) -> None:
        """Return once the buffer has fallen to three quarters of ``size`` (at once if it is there)."""
        self._room.clear()
        if len(self.items) > self.size * 3 // 4:
            await self._room.wait()

    def pop(self) -> tuple[Built, asyncio.Future[None]] | None:
        if not self.items:
            return None
        got = self.items.popleft()
        if len(self.items) <= self.size * 3 // 4:
            self._room.set()
        return got

    async def take(self) -> tuple[Built, asyncio.Future[None]] | None:
        while not self.items:
            if self.ended:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self.pop()


async def send_built(
    snd: Sender,
    source: Iterator[Built],
    items: Mapping[str, Item],
    sender: str,
    lw: LedgerWriter,
    progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Send every built message from ``source`` with ``snd``'s concurrency, recording each in the ledger.

    ``source`` is consumed in a thread (splitting and composing are CPU work that must not stall the
    senders). Each message is reserved in the ledger (marked ``sending``, see
    :meth:`LedgerWriter.reserve`) when it enters the lookahead buffer (:class:`_Ahead`), so up to
    :data:`LOOKAHEAD` marks share a commit while earlier messages are on the wire; its DATA still waits for
    its own mark, and the journal's ``S`` line is written just before the first octet.
    """
    limits = snd.transport.limits
    # A paced provider (Office 365: 30/min) gains nothing from marking far ahead; after an OS crash every
    # message marked ahead is 'unknown', so keep that to one per connection there.
    ahead = _Ahead(limits.concurrency if limits.messages_per_minute else LOOKAHEAD)
    done = 0

    async def feed() -> None:
        batch: collections.deque[Built] = collections.deque()
        while True:
            while ahead.wants_more():
                if not batch:
                    batch.extend(await asyncio.to_thread(lambda: list(itertools.islice(source, FETCH_BATCH))))
                    if not batch:
                        ahead.end()
                        return
                built = batch.popleft()
                marked = lw.reserve(
                    built.key,
                    filename=built.filename,
                    attachment_sha256=built.attachment_sha256,
                    message_id=built.message_id,
                )
                ahead.put(built, marked)
            await ahead.room()

    def work(built: Built, marked: asyncio.Future[None]) -> Work:
        item = items[built.key]
        rcpts = (item.to_override,) if item.to_override else item.msg.tag.recipients
        env = Envelope(
            sender=_address_of(item.rendered.sender) or sender,
            recipients=rcpts,
            data=built.data,
            smtputf8=not all(a.isascii() for a in (*rcpts, sender)),
            payload=built.payload,
        )
        key = built.key
        tries = 0

        async def mark_sending() -> None:
            nonlocal tries
            tries += 1
            if tries == 1:
                await marked
            else:  # a retry: one more attempt on record
                await lw.update(key, "sending", "")
            lw.started(key)

        def mark_now() -> bool:
            """The first attempt's mark, when its commit is already done (the usual case: marks run ahead)."""
            nonlocal tries
            if tries or not marked.done() or marked.cancelled() or marked.exception() is not None:
                return False
            tries = 1
            lw.started(key)
            return True

        def finished(outcome: Outcome) -> None:
            nonlocal done
            lw.update_soon(key, outcome.status, outcome.reply)
            done += 1
            progress(done)

        return Work(env, mark_sending, finished, mark_now)

    async def take() -> Work | None:
        got = await ahead.take()
        return None if got is None else work(*got)

    def poll() -> Work | None:
        got = ahead.pop()
        return None if got is None else work(*got)

    await asyncio.gather(snd.run(take, poll), feed())


async def _send_drafts(
    opts: Options, job: JobConfig, pdf_password: str | None, todo: list[Item], ledger: Ledger, job_id: str
) -> int:
    assert opts.to_drafts is not None
    target = parse_drafts_url(opts.to_drafts)
    password = _password(opts, "POSTROOM_IMAP_PASSWORD", f"IMAP password for {target.user}", "POSTROOM_SMTP_PASSWORD")
    writer = await asyncio.to_thread(DraftsWriter, target, password)
    try:
        async with LedgerWriter(ledger, job_id) as lw:
            with ProgressView("saving drafts", len(todo), fancy=opts.fancy) as pv:
                for n, built in enumerate(produce(opts.pdf, pdf_password, job, todo, workers=opts.workers), 1):
                    meta = {
                        "filename": built.filename,
                        "attachment_sha256": built.attachment_sha256,
                        "message_id": built.message_id,
                    }
                    await lw.update(built.key, "sending", "", **meta)
                    try:
                        reply = await asyncio.to_thread(writer.append, built.data)
                    except HandoffError as exc:
                        await lw.update(built.key, "failed", str(exc))
                        continue
                    await lw.update(built.key, "sent", reply)
                    pv.update(n)
    finally:
        writer.close()
    return EXIT_OK


def summarize_rows(rows: list[Row]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def plan_only(opts: Options) -> tuple[Plan, dict[str, Rendered]]:
    """Scan and plan without any output (used by tests and the benchmark)."""
    job = load_job(opts.config) if opts.config else default_job()
    pdf_password = os.environ.get("POSTROOM_PDF_PASSWORD") or None
    count = pdfmod.check_pdf(opts.pdf, pdf_password)
    scans = pdfmod.scan(opts.pdf, count, password=pdf_password, workers=opts.workers)
    plan = make_plan(scans, group=job.group, untagged=job.untagged, templates=job.templates.keys())
    return preflight(job, plan, opts.pdf.stem)


__all__ = ["Options", "PlannedMessage", "output_dir", "plan_only", "run_job"]
