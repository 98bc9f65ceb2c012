"""Render a planned message's texts and build the MIME message around its PDF.

Invariants:
- Rendering is strict: an undefined Jinja2 variable or an unknown ``{name}`` in a file name or password
  pattern is a :class:`RenderError` naming the template and the page; :func:`render` is called for every
  message during the pre-flight, so a bad template is found before anything is sent.
- Attachment file names are made safe (:func:`safe_filename`): no path separators, control or reserved
  characters, no leading dots, no Windows device names, bounded length, always ending in ``.pdf``.
- The Message-ID is stable (:func:`stable_message_id`): derived from the job and the message key, so a
  re-sent message carries the same id as the first attempt. Bcc never appears in the headers.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate, getaddresses, parseaddr

import jinja2

from postroom.burst import mime
from postroom.burst.jobconfig import JobConfig, MessageTemplate, compiled
from postroom.burst.plan import PlannedMessage
from postroom.errors import PostroomError

MAX_FILENAME_CHARS = 120  # well under the 255 of common file systems, leaves room for a directory
_PATTERN_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]+')
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}


class RenderError(PostroomError):
    """A template could not be rendered for a message; the text names template and page."""


@dataclass(frozen=True, slots=True)
class Rendered:
    """Everything textual about one message, ready to be built."""

    subject: str
    text: str
    html: str | None
    filename: str
    password: str | None
    sender: str
    reply_to: tuple[str, ...]


def template_for(job: JobConfig, msg: PlannedMessage) -> MessageTemplate:
    return job.templates[msg.template]


def context(msg: PlannedMessage, source: str) -> dict[str, object]:
    """The names templates can use (documented in ``docs/burst.md``)."""
    tag = msg.tag
    ctx: dict[str, object] = {}
    ctx.update(tag.variables)
    ctx.update(
        {
            "vars": dict(tag.variables),
            "to": tag.to[0] if tag.to else "",
            "email": tag.to[0] if tag.to else "",
            "to_all": ", ".join(tag.to),
            "cc": ", ".join(tag.cc),
            "pages": msg.page_text,
            "page_list": list(msg.pages),
            "page_count": len(msg.pages),
            "first_page": msg.pages[0],
            "last_page": msg.pages[-1],
            "template": msg.template,
            "message_id": tag.template or "",
            "seq": msg.seq,
            "source": source,
        }
    )
    return ctx


def format_pattern(pattern: str, ctx: Mapping[str, object], what: str) -> str:
    """Fill ``{name}`` fields; ``{{``/``}}`` are literal braces. Unknown names raise :class:`KeyError`."""

    def field(m: re.Match[str]) -> str:
        if m.group(0) == "{{":
            return "{"
        if m.group(0) == "}}":
            return "}"
        name = m.group(1).strip()
        if name not in ctx or isinstance(ctx[name], dict | list):
            raise KeyError(f"{what} uses {{{name}}}, which this message does not define")
        return str(ctx[name])

    return _PATTERN_FIELD.sub(field, pattern)


def safe_filename(name: str, default: str = "document") -> str:
    """A file name any OS and mail program accepts, ending in ``.pdf``."""
    name = unicodedata.normalize("NFC", name)
    name = _UNSAFE.sub("_", name).strip().strip(".").strip()
    stem = name[:-4] if name.lower().endswith(".pdf") else name
    stem = re.sub(r"\s+", " ", stem).strip(" ._") or default
    if stem.split(".")[0].upper() in _WINDOWS_DEVICES:
        stem = "_" + stem
    stem = stem[: MAX_FILENAME_CHARS - 4].rstrip(" .")
    return stem + ".pdf"


def render(job: JobConfig, msg: PlannedMessage, source: str) -> Rendered:
    """Render every text of ``msg``. Raises :class:`RenderError` naming template and page."""
    tpl = template_for(job, msg)
    where = f"template {tpl.name!r} ({job.source}) for page {msg.pages[0]}"
    ctx = context(msg, source)
    try:
        pattern = msg.tag.filename or tpl.filename or job.filename
        filename = safe_filename(format_pattern(pattern, ctx, "the file name pattern"))
        ctx["filename"] = filename
        pw_pattern = msg.tag.password or tpl.password or job.password
        password = format_pattern(pw_pattern, ctx, "the password pattern") if pw_pattern else None
        subject = msg.tag.subject or compiled(tpl.subject).render(ctx)
        text = compiled(tpl.text).render(ctx)
        html = compiled(tpl.html, html=True).render(ctx) if tpl.html is not None else None
    except KeyError as exc:
        raise RenderError(f"{where}: {exc.args[0]}") from None
    except jinja2.UndefinedError as exc:
        raise RenderError(f"{where}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise RenderError(f"{where}: {exc}") from None
    if password == "":
        raise RenderError(f"{where}: the password pattern gives an empty password")
    sender = tpl.sender or job.sender or ""
    reply_to = msg.tag.reply_to or tuple(a for _, a in getaddresses([tpl.reply_to or job.reply_to or ""]) if a)
    return Rendered(
        subject=" ".join(subject.split()),
        text=text,
        html=html,
        filename=filename,
        password=password or None,
        sender=sender,
        reply_to=reply_to,
    )


def stable_message_id(job_id: str, key: str, sender: str) -> str:
    """``<hash.burst@domain>``: the same for the same job and message on every run."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or "postroom.invalid"
    digest = hashlib.sha256(f"{job_id}\n{key}".encode()).hexdigest()[:40]
    return f"<{digest}.burst@{domain}>"


def build(
    msg: PlannedMessage,
    rendered: Rendered,
    pdf: bytes,
    job: JobConfig,
    *,
    message_id: str,
    to_override: str | None = None,
) -> bytes:
    """The complete message as bytes with CRLF line ends (RFC 5322), ready for DATA or a ``.eml`` file."""
    tpl = template_for(job, msg)
    tag = msg.tag
    headers: list[tuple[str, str]] = []
    if rendered.sender:
        headers.append(("From", mime.encode_mailbox(rendered.sender)))
    if to_override is not None:
        headers.append(("To", mime.address_list([to_override])))
        headers.append(("X-Postroom-Burst-Test-For", mime.address_list(tag.to)))
    else:
        headers.append(("To", mime.address_list(tag.to)))
        if tag.cc:
            headers.append(("Cc", mime.address_list(tag.cc)))
    if rendered.reply_to:
        headers.append(("Reply-To", mime.address_list(rendered.reply_to)))
    headers.append(("Subject", mime.encode_text(rendered.subject)))
    headers.append(("Date", formatdate(localtime=True)))
    headers.append(("Message-ID", mime.encode_text(message_id)))
    attachments = [(pdf, "application/pdf", rendered.filename)]
    attachments += [(a.data, a.content_type, a.filename) for a in (*job.attachments, *tpl.attachments)]
    return mime.message(headers, rendered.text, rendered.html, attachments)
