"""Progress while the job runs and the per-recipient report after it (CSV and a self-contained HTML page).

Invariants:
- On a terminal, progress is a ``rich`` bar with rate and ETA on stderr; otherwise plain lines, at most
  one every :data:`PLAIN_INTERVAL` seconds plus the last, so logs stay readable.
- The HTML report has no external resources (inline CSS, no scripts) and escapes every value.
- Reports list every planned message with its status; nothing in them is a secret (no passwords).
"""

from __future__ import annotations

import csv
import html
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from postroom.burst.ledger import Row
from postroom.burst.plan import format_pages

PLAIN_INTERVAL = 2.0  # seconds between plain progress lines

REPORT_COLUMNS = ("seq", "recipients", "pages", "filename", "status", "reply", "message_id", "attachment_sha256")


class ProgressView:
    """One progress display for one phase; use as a context manager."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, fancy: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.fancy = self.stream.isatty() if fancy is None else fancy
        self.done = 0
        self._last = 0.0
        self._start = time.monotonic()
        self._rich: Progress | None = None
        self._task = None

    def __enter__(self) -> ProgressView:
        if self.fancy:
            self._rich = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.label, total=self.total, rate="")  # type: ignore[assignment]
        return self

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self._rich is not None and self._task is not None:
            rate = done / max(1e-6, now - self._start)
            self._rich.update(self._task, completed=done, rate=f"{rate:.0f}/s")
            return
        if now - self._last >= PLAIN_INTERVAL or done >= self.total:
            self._last = now
            rate = done / max(1e-6, now - self._start)
            print(f"{self.label}: {done}/{self.total} ({rate:.0f}/s)", file=self.stream, flush=True)

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()


def write_reports(out_dir: Path, rows: Sequence[Row], *, title: str) -> tuple[Path, Path]:
    """Write ``report.csv`` and ``report.html`` into ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "report.csv"
    html_path = out_dir / "report.html"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(REPORT_COLUMNS)
        for r in rows:
            w.writerow(
                [
                    r.seq,
                    " ".join(r.recipients),
                    format_pages(r.pages),
                    r.filename,
                    r.status,
                    r.reply,
                    r.message_id,
                    r.attachment_sha256,
                ]
            )
    counts = Counter(r.status for r in rows)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    body = "\n".join(
        "<tr class='{cls}'><td>{seq}</td><td>{rcpt}</td><td>{pages}</td><td>{fn}</td><td>{st}</td>"
        "<td>{reply}</td></tr>".format(
            cls=html.escape(r.status),
            seq=r.seq,
            rcpt=html.escape(", ".join(r.recipients)),
            pages=html.escape(format_pages(r.pages)),
            fn=html.escape(r.filename),
            st=html.escape(r.status),
            reply=html.escape(r.reply),
        )
        for r in rows
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #eee; }}
tr.sent td:nth-child(5) {{ color: #070; }}
tr.failed td:nth-child(5), tr.unknown td:nth-child(5) {{ color: #b00; font-weight: bold; }}
tr.deferred td:nth-child(5), tr.planned td:nth-child(5) {{ color: #a60; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(rows)} messages: {html.escape(summary)}</p>
<table><thead><tr><th>#</th><th>Recipients</th><th>Pages</th><th>File</th><th>Status</th><th>Reply</th></tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""
    html_path.write_text(page, encoding="utf-8")
    return csv_path, html_path
