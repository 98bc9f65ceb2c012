"""Burst benchmark: scan + split + compose pages/s vs a straightforward pypdf pipeline, and SMTP sending
rate vs Postfix's smtp-source against the same smtp-sink at the same concurrency.

    python bench/burst.py            # 10,000 pages / 2,000 recipients, 2,000 messages to smtp-sink
    python bench/burst.py --quick    # a few seconds (CI)
    python bench/burst.py --sending-only --pages 2000 --recipients 2000   # only the SMTP part

Both pipelines do the same work: find the tags of every page, plan, render the templates, write one PDF per
recipient and compose the MIME message around it. The baseline is what one writes first: pypdf's
``extract_text`` page by page and a ``PdfWriter`` per group, in one process. Postroom's uses pypdfium2 for
text (once per page, text only) and pikepdf for splitting, over all cores.

Sending: the messages Postroom built are sent through its real sender path (``send_built``: the
``Sender`` on ``postroom.delivery.client.SmtpClient`` with PIPELINING and connection reuse, the ledger's
``LedgerWriter`` with a durable "sending" mark before every DATA, and the send log) to ``smtp-sink`` on
127.0.0.1; ``smtp-source -d`` sends the same number of messages of the same size with the same number of
sessions to the same sink. CPU per message is this process's user + system time over the sending span
(ledger thread included). Peers missing: the sending part is skipped and says so.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pypdf
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas

from postroom.burst import pdf as pdfmod
from postroom.burst.compose import build, stable_message_id
from postroom.burst.job import preflight, send_built
from postroom.burst.jobconfig import job_from_dict
from postroom.burst.ledger import Ledger, LedgerWriter
from postroom.burst.plan import PageScan, make_plan
from postroom.burst.produce import Built, Item, produce
from postroom.burst.tags import TagError, find_tags, has_tag_marker
from postroom.burst.transport import Sender, parse_transport
from postroom.net import eventloop

JOB = {
    "from": "Billing <billing@example.test>",
    "templates": {
        "INV": {
            "subject": "Invoice {{ v1 }} for {{ v2 }}",
            "text": "Dear {{ v2 }},\nyour invoice {{ v1 }} ({{ page_count }} pages) is attached.\n",
            "html": "<p>Dear {{ v2 }},</p><p>invoice {{ v1 }} is attached.</p>",
            "filename": "Invoice-{v1}.pdf",
        }
    },
}


def make_report(path: Path, pages: int, recipients: int) -> None:
    """A report like a billing run: 40 lines of items per page, one white 1-pt tag per invoice."""
    c = canvas.Canvas(str(path), pagesize=A4)
    per = pages / recipients
    for p in range(pages):
        r = int(p / per)
        first = int(r * per) == p
        c.setFont("Helvetica-Bold", 14)
        c.drawString(72, 790, f"Invoice {r:05d}")
        c.setFont("Helvetica", 9)
        for line in range(40):
            c.drawString(
                72,
                760 - 17 * line,
                f"{line:02d} widget {p * 40 + line:07d}  qty {line % 9 + 1}  price {line * 1.25:8.2f}",
            )
        if first:
            c.saveState()
            c.setFillColorRGB(1, 1, 1)
            c.setFont("Helvetica", 1)
            syntax = r % 2
            if syntax:
                c.drawString(
                    40, 20, f"[[postroom to=cust{r}@example.test; template=INV; var.v1={r}; var.v2=`Cust {r}`]]"
                )
            else:
                c.drawString(40, 20, f"<pdfexplode>{r},`Cust {r}`%INV#cust{r}@example.test</pdfexplode>")
            c.restoreState()
        c.showPage()
    c.save()


def postroom_pipeline(path: Path, workers: int) -> tuple[int, int]:
    """Scan, plan, render, split, compose; returns (messages, bytes)."""
    job = job_from_dict(JOB, source="bench", base=path.parent)
    count = pdfmod.check_pdf(path)
    scans = pdfmod.scan(path, count, workers=workers)
    plan, rendered = preflight(job, make_plan(scans, templates=job.templates.keys()), path.stem)
    assert not plan.errors, plan.errors[:3]
    items = [Item(m, rendered[m.key], stable_message_id("bench", m.key, rendered[m.key].sender)) for m in plan.messages]
    n = size = 0
    for built in produce(path, None, job, items, workers=workers, for_smtp=True):
        n += 1
        size += len(built.data)
    return n, size


def pypdf_pipeline(path: Path) -> tuple[int, int]:
    """The straightforward version: pypdf text page by page, one PdfWriter per group, same composer."""
    job = job_from_dict(JOB, source="bench", base=path.parent)
    reader = pypdf.PdfReader(str(path))
    scans = []
    for i, page in enumerate(reader.pages, 1):
        text = page.extract_text() or ""
        try:
            scans.append(PageScan(i, tuple(find_tags(text)) if has_tag_marker(text) else ()))
        except TagError as exc:
            scans.append(PageScan(i, error=str(exc)))
    plan, rendered = preflight(job, make_plan(scans, templates=job.templates.keys()), path.stem)
    assert not plan.errors, plan.errors[:3]
    n = size = 0
    for m in plan.messages:
        writer = pypdf.PdfWriter()
        for p in m.pages:
            writer.add_page(reader.pages[p - 1])
        buf = io.BytesIO()
        writer.write(buf)
        r = rendered[m.key]
        data = build(m, r, buf.getvalue(), job, message_id=stable_message_id("bench", m.key, r.sender))
        n += 1
        size += len(data)
    return n, size


def timed(label: str, pages: int, fn: object, *args: object) -> float:
    t0 = time.perf_counter()
    n, size = fn(*args)  # type: ignore[operator]
    dt = time.perf_counter() - t0
    rate = pages / dt
    print(f"  {label:<44} {dt:7.2f} s  {rate:8.0f} pages/s  ({n} messages, {size / n / 1024:.1f} KiB each)")
    return rate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


async def send_postroom(
    built: list[Built], items: dict[str, Item], port: int, concurrency: int, ledger: Path
) -> tuple[float, float, float]:
    """Send through the real path (Sender + send_built + LedgerWriter); (wall s, user s, system s) of the
    sending itself, ledger thread included (the ledger's set-up before and its read-back after are not)."""
    t = parse_transport(f"smtp://127.0.0.1:{port}?concurrency={concurrency}")
    snd = Sender(t, None)
    led = Ledger(ledger)
    led.prepare("bench", [it.msg for it in items.values()])
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    async with LedgerWriter(led, "bench") as lw:
        await send_built(snd, iter(built), items, "billing@example.test", lw)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    await snd.close()
    bad = [r for r in led.rows("bench") if r.status != "sent"]
    led.close()
    assert not bad, bad[:3]
    return dt, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime


def sending(path: Path, messages: int, concurrency: int, tmp: Path, runs: int) -> None:
    sink, source = shutil.which("smtp-sink"), shutil.which("smtp-source")
    if not sink or not source:
        print("  sending: skipped (smtp-sink / smtp-source not installed)")
        return
    job = job_from_dict(JOB, source="bench", base=path.parent)
    count = pdfmod.check_pdf(path)
    scans = pdfmod.scan(path, count)
    plan, rendered = preflight(job, make_plan(scans, templates=job.templates.keys()), path.stem)
    msgs = plan.messages[:messages]
    items = {m.key: Item(m, rendered[m.key], stable_message_id("bench", m.key, rendered[m.key].sender)) for m in msgs}
    built = list(produce(path, None, job, list(items.values()), for_smtp=True))
    avg = sum(len(b.data) for b in built) // len(built)
    port = free_port()
    cmd = [sink, "-c", f"127.0.0.1:{port}", "256"]
    if os.geteuid() == 0:
        cmd[1:1] = ["-u", "postfix"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def source_rate(*flags: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(
            [source, *flags, "-s", str(concurrency), "-m", str(len(built)), "-l", str(avg),
             "-f", "billing@example.test", "-t", "cust@example.test", f"127.0.0.1:{port}"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600,
        )  # fmt: skip
        return len(built) / (time.perf_counter() - t0)

    refs: list[float] = []
    fresh: list[float] = []
    ours: list[float] = []
    cpus: list[float] = []
    syss: list[float] = []
    try:
        wait_port(port)
        for run in range(runs):  # interleaved, medians
            refs.append(source_rate("-d"))
            # on the loop `postroom burst` sends on (postroom.net.eventloop: uvloop by default)
            dt, user, system = eventloop.run(
                send_postroom(built, items, port, concurrency, tmp / f"ledger{run}.sqlite")
            )
            cpus.append((user + system) / len(built))
            syss.append(system / len(built))
            ours.append(len(built) / dt)
            fresh.append(source_rate())
    finally:
        proc.terminate()
        proc.wait(10)
    ref, new, mine, cpu, sys_cpu = (statistics.median(x) for x in (refs, fresh, ours, cpus, syss))
    print(f"  (medians of {runs} interleaved runs; per run: smtp-source -d {_runs(refs)}, postroom {_runs(ours)})")
    print(f"  smtp-source -d (reuse), -s {concurrency}, -l {avg}        {ref:8.0f} messages/s")
    print(f"  smtp-source (new connection per message)     {new:8.0f} messages/s")
    print(
        f"  postroom sender (ledger, reuse, {concurrency} conns)       {mine:8.0f} messages/s  "
        f"= {100 * mine / ref:.0f}% of smtp-source -d (target >= 80%); {cpu * 1e6:.0f} us CPU per message "
        f"({sys_cpu * 1e6:.0f} us of it in the kernel)"
    )


def _runs(values: list[float]) -> str:
    return " / ".join(f"{v:.0f}" for v in values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    ap.add_argument("--pages", type=int)
    ap.add_argument("--recipients", type=int)
    ap.add_argument("--messages", type=int, help="messages to send to smtp-sink")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, help="interleaved runs of the page pipelines (median); default 3, quick 1")
    ap.add_argument("--sending-only", action="store_true", help="skip the page pipelines; only the SMTP part")
    args = ap.parse_args()
    pages = args.pages or (300 if args.quick else 10_000)
    recipients = args.recipients or (60 if args.quick else 2_000)
    messages = args.messages or (60 if args.quick else 2_000)
    args.runs = args.runs or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        report = tmp / "report.pdf"
        t0 = time.perf_counter()
        make_report(report, pages, recipients)
        print(
            f"report: {pages} pages, {recipients} recipients, {report.stat().st_size / 1e6:.1f} MB "
            f"(generated in {time.perf_counter() - t0:.1f} s); {os.cpu_count()} CPUs, {sys.version.split()[0]}"
        )
        if args.sending_only:
            print(f"sending {min(messages, recipients)} messages to smtp-sink on 127.0.0.1:")
            sending(report, messages, args.concurrency, tmp, args.runs)
            return 0
        print("scan + split + compose:")
        rates: dict[str, list[float]] = {"base": [], "single": [], "ours": []}
        for run in range(1, args.runs + 1):  # interleaved, so background load hits all three alike
            print(f" run {run}/{args.runs}")
            rates["base"].append(timed("pypdf baseline (1 process)", pages, pypdf_pipeline, report))
            rates["single"].append(timed("postroom, 1 process", pages, postroom_pipeline, report, 1))
            rates["ours"].append(
                timed(f"postroom, {args.workers} processes", pages, postroom_pipeline, report, args.workers)
            )
        base, single, ours = (statistics.median(rates[k]) for k in ("base", "single", "ours"))
        print(
            f"  medians: pypdf {base:.0f}, postroom 1 process {single:.0f}, {args.workers} processes {ours:.0f} "
            f"pages/s; speed-up vs pypdf: {ours / base:.1f}x ({single / base:.1f}x in one process; target >= 8x)"
        )
        print(f"sending {min(messages, recipients)} messages to smtp-sink on 127.0.0.1:")
        sending(report, messages, args.concurrency, tmp, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
