"""The PDF side of a burst: open and check the report, scan pages for tags, split pages out.

Text comes from ``pypdfium2`` (fast, handles tiny and white text like any other), pages are copied with
``pikepdf``/QPDF (objects a document's pages share, such as fonts, are copied once per output file).

Invariants:
- :func:`check_pdf` opens the report once before any work: an encrypted report without the right
  password, or a file that is not a PDF, is a :class:`PdfInputError` naming the file.
- Scanning extracts each page's text exactly once, and only its text (no bounding boxes or per-character
  calls); the tag grammar runs only on pages whose text holds a tag marker. Pages are scanned by worker
  processes in page ranges (text extraction is CPU-bound and pdfium is not thread-safe); small reports are
  scanned in-process.
- A page that cannot be read becomes a :class:`PageScan` with an error, never a silently untagged page.
- :func:`split` writes a compressed PDF holding exactly the given pages, optionally AES-256 encrypted
  (PDF 2.0 security handler R6) with a per-message user password.
"""

from __future__ import annotations

import atexit
import ctypes
import io
import multiprocessing
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pikepdf
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from postroom.burst.plan import PageScan
from postroom.burst.tags import TagError, find_tags, has_tag_marker
from postroom.errors import PostroomError

IN_PROCESS_PAGES = 256  # below this, worker start-up costs more than it saves
PAGES_PER_CHUNK = 200  # a unit of work for a scanning process; also the progress granularity


class PdfInputError(PostroomError):
    """The report cannot be used: not a PDF, damaged, or encrypted without the right password."""


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def check_pdf(path: str | Path, password: str | None = None) -> int:
    """Open the report with both libraries and return its page count. Raises :class:`PdfInputError`."""
    path = Path(path)
    if not path.is_file():
        raise PdfInputError(f"{path}: no such file")
    try:
        doc = pdfium.PdfDocument(str(path), password=password)
    except pdfium.PdfiumError as exc:
        text = str(exc)
        if "password" in text.lower():
            if password:
                raise PdfInputError(f"{path}: the PDF password is wrong") from None
            raise PdfInputError(f"{path}: the PDF is encrypted; give its password in POSTROOM_PDF_PASSWORD") from None
        raise PdfInputError(f"{path}: not a readable PDF ({text})") from None
    try:
        count = len(doc)
    finally:
        doc.close()
    try:
        with pikepdf.open(path, password=password or "") as pdf:
            if len(pdf.pages) != count:
                raise PdfInputError(f"{path}: the PDF is damaged (page count differs between readers)")
    except pikepdf.PasswordError:
        raise PdfInputError(f"{path}: the PDF is encrypted; give its password in POSTROOM_PDF_PASSWORD") from None
    except pikepdf.PdfError as exc:
        raise PdfInputError(f"{path}: the PDF is damaged ({exc})") from None
    if count == 0:
        raise PdfInputError(f"{path}: the PDF has no pages")
    return count


def page_text(doc: pdfium.PdfDocument, index: int) -> str:
    """All text of page ``index`` (0-based), extracted once, through pdfium's C API directly.

    The helper objects of pypdfium2 cost about an eighth of the time per page; this is the same
    FPDF_LoadPage / FPDFText_LoadPage / FPDFText_GetText sequence they run. Raises PdfiumError.
    """
    page = pdfium_c.FPDF_LoadPage(doc.raw, index)
    if not page:
        raise pdfium.PdfiumError(f"page {index + 1} cannot be loaded")
    try:
        textpage = pdfium_c.FPDFText_LoadPage(page)
        if not textpage:
            raise pdfium.PdfiumError(f"the text of page {index + 1} cannot be loaded")
        try:
            count = pdfium_c.FPDFText_CountChars(textpage)
            if count <= 0:
                return ""
            buf = ctypes.create_string_buffer((count + 1) * 2)
            got = pdfium_c.FPDFText_GetText(textpage, 0, count, ctypes.cast(buf, ctypes.POINTER(ctypes.c_ushort)))
            return buf.raw[: max(0, got - 1) * 2].decode("utf-16-le", errors="replace")
        finally:
            pdfium_c.FPDFText_ClosePage(textpage)
    finally:
        pdfium_c.FPDF_ClosePage(page)


def scan_range(path: str, password: str | None, start: int, stop: int) -> list[PageScan]:
    """Scan pages ``start`` … ``stop - 1`` (0-based) of the report; one :class:`PageScan` each."""
    out: list[PageScan] = []
    doc = pdfium.PdfDocument(path, password=password)
    try:
        for index in range(start, stop):
            page_no = index + 1
            try:
                text = page_text(doc, index)
            except pdfium.PdfiumError as exc:
                out.append(PageScan(page_no, error=f"the page's text cannot be read ({exc})"))
                continue
            if not has_tag_marker(text):
                out.append(PageScan(page_no))
                continue
            try:
                out.append(PageScan(page_no, tuple(find_tags(text))))
            except TagError as exc:
                out.append(PageScan(page_no, error=str(exc)))
    finally:
        doc.close()
    return out


def _chunks(count: int, workers: int) -> list[tuple[int, int]]:
    size = max(1, min(PAGES_PER_CHUNK, -(-count // (workers * 4))))
    return [(s, min(count, s + size)) for s in range(0, count, size)]


_POOLS: dict[int, ProcessPoolExecutor] = {}
PR_SET_PDEATHSIG = 1  # Linux prctl(2): the signal a process gets when its parent dies


def _die_with_parent() -> None:
    """Pool worker initializer: end when the process that started us dies.

    A burst killed with SIGKILL (or a crash) cannot shut its pool down; without this its workers would wait
    on their task pipe forever. Linux only; elsewhere the workers go when their pipe closes.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


def pool(workers: int) -> ProcessPoolExecutor:
    """The process pool of this many workers, created once and reused by scanning and splitting.

    Workers are forked when this process has a single thread (the CLI creates the pool before any thread
    starts); otherwise they come from ``forkserver``, a clean single-threaded process, so a lock held by
    another thread can never be copied into a worker.
    """
    ex = _POOLS.get(workers)
    if ex is None:
        methods = multiprocessing.get_all_start_methods()
        if "fork" in methods and threading.active_count() == 1:
            method = "fork"  # nothing else runs in this process: a fork copies no held lock, and is instant
        else:
            method = "forkserver" if "forkserver" in methods else "spawn"
        ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(["postroom.burst.produce"])
        ex = _POOLS[workers] = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_die_with_parent)
        atexit.register(ex.shutdown, wait=True, cancel_futures=True)
        # Start every worker now, while the choice above still holds (the executor adds threads).
        for fut in [ex.submit(os.getpid) for _ in range(workers * 2)]:
            fut.result()
    return ex


def discard_pool(workers: int) -> None:
    """Forget a pool whose worker died (BrokenProcessPool); the next call starts a fresh one."""
    ex = _POOLS.pop(workers, None)
    if ex is not None:
        ex.shutdown(wait=False, cancel_futures=True)


def scan(
    path: str | Path,
    page_count: int,
    *,
    password: str | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[PageScan]:
    """Scan every page, in parallel for big reports. ``progress(n)`` is called with pages done so far."""
    path = str(path)
    workers = workers or default_workers()
    if workers == 1 or page_count <= IN_PROCESS_PAGES:
        result: list[PageScan] = []
        for start, stop in _chunks(page_count, 1):
            result.extend(scan_range(path, password, start, stop))
            if progress:
                progress(len(result))
        return result
    results: list[PageScan] = []
    ex = pool(workers)
    try:
        futures = [ex.submit(scan_range, path, password, a, b) for a, b in _chunks(page_count, workers)]
        for fut in futures:
            results.extend(fut.result())
            if progress:
                progress(len(results))
    except BrokenProcessPool:
        discard_pool(workers)
        raise
    return results


def split(
    src: pikepdf.Pdf, pages: Sequence[int], password: str | None = None, *, page_list: Sequence[pikepdf.Page] = ()
) -> bytes:
    """A new PDF with exactly ``pages`` (1-based) of ``src``; AES-256 encrypted when ``password`` is set.

    ``page_list`` is ``list(src.pages)`` made once by the caller: pikepdf's ``src.pages[i]`` walks the page
    list on every call (milliseconds each in a 10,000-page report).
    """
    if not page_list:
        page_list = list(src.pages)
    out = pikepdf.Pdf.new()
    try:
        out.pages.extend(page_list[p - 1] for p in pages)
        buf = io.BytesIO()
        kwargs: dict[str, object] = {}
        if password:
            # R=6 is the AES-256 handler; the owner password is random: nobody may lift the restrictions.
            kwargs["encryption"] = pikepdf.Encryption(user=password, owner=secrets.token_urlsafe(24), R=6)
        out.save(
            buf,
            compress_streams=True,
            object_stream_mode=pikepdf.ObjectStreamMode.generate,
            deterministic_id=not password,
            **kwargs,  # type: ignore[arg-type]
        )
        return buf.getvalue()
    finally:
        out.close()


_OPEN: dict[tuple[str, str | None], tuple[tuple[int, int], pikepdf.Pdf, list[pikepdf.Page]]] = {}


def _source(path: str, password: str | None) -> tuple[pikepdf.Pdf, list[pikepdf.Page]]:
    """The report opened with pikepdf and its page list, kept in this process while the file is unchanged.

    Opening parses the whole cross-reference table (a tenth of a second for a 10,000-page report), and a
    worker splits many chunks of the same report.
    """
    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_size)
    key = (path, password)
    hit = _OPEN.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1], hit[2]
    for _, old, _ in _OPEN.values():
        old.close()
    _OPEN.clear()
    src = pikepdf.open(path, password=password or "")
    pages = list(src.pages)
    _OPEN[key] = (stamp, src, pages)
    return src, pages


def iter_split(
    path: str | Path, jobs: Sequence[tuple[Sequence[int], str | None]], password: str | None = None
) -> Iterator[bytes]:
    """Split several page lists from the report (opened once per process)."""
    src, page_list = _source(str(path), password)
    for pages, pw in jobs:
        yield split(src, pages, pw, page_list=page_list)
