"""The burst job configuration (``burst.toml``): sender, grouping rules and one message template per id.

Invariants:
- Loading validates every key and type and compiles every Jinja2 template (StrictUndefined) once; any
  problem is a :class:`~postroom.errors.ConfigError` naming the file and the key or template.
- Unknown keys are errors (a typo must not silently drop a setting).
- Static attachments are read at load time, so a missing file fails before anything is planned or sent.
- Without a file, :func:`default_job` gives a working configuration with one ``default`` template.
- The config is picklable: templates are kept as source text; :func:`compiled` compiles and caches per
  process (worker processes compile their own).
"""

from __future__ import annotations

import functools
import mimetypes
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2

from postroom.errors import ConfigError

DEFAULT_TEMPLATE = "default"
DEFAULT_FILENAME = "{source}-{first_page}.pdf"
DEFAULT_SUBJECT = "Your document {{ filename }}"
DEFAULT_TEXT = "Hello,\n\nplease find attached {{ filename }} ({{ page_count }} page{{ 's' if page_count != 1 }}).\n"
MAX_ATTACHMENT_BYTES = 25 * 1024 * 1024  # what Gmail and Office 365 accept per message, all parts together

GroupMode = Literal["consecutive", "all"]
UntaggedMode = Literal["continue", "report"]


@dataclass(frozen=True, slots=True)
class Attachment:
    """A static file attached to every message of a template (terms and conditions …)."""

    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class MessageTemplate:
    """One ``[templates.ID]`` table. Text fields are Jinja2 sources; ``filename``/``password`` use ``{name}``."""

    name: str
    subject: str
    text: str
    html: str | None = None
    sender: str | None = None
    reply_to: str | None = None
    filename: str | None = None
    password: str | None = None
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True, slots=True)
class JobConfig:
    """The whole job. ``templates`` maps message id → template."""

    sender: str | None = None
    reply_to: str | None = None
    group: GroupMode = "consecutive"
    untagged: UntaggedMode = "continue"
    filename: str = DEFAULT_FILENAME
    password: str | None = None
    attachments: tuple[Attachment, ...] = ()
    templates: dict[str, MessageTemplate] = field(default_factory=dict)
    source: str = "(built-in defaults)"


_JOB_KEYS = {"from", "reply_to", "group", "untagged", "filename", "password", "attachments", "templates"}
_TEMPLATE_KEYS = {
    "subject",
    "text",
    "text_file",
    "html",
    "html_file",
    "from",
    "reply_to",
    "filename",
    "password",
    "attachments",
}


def default_job() -> JobConfig:
    """The configuration used without ``--config``: one plain template, names like ``report-3.pdf``."""
    return JobConfig(templates={DEFAULT_TEMPLATE: MessageTemplate(DEFAULT_TEMPLATE, DEFAULT_SUBJECT, DEFAULT_TEXT)})


def _str(where: str, key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string")
    return value


def _attachments(where: str, base: Path, value: object) -> tuple[Attachment, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: attachments must be a list of file names")
    out = []
    for name in value:
        path = (base / name).resolve()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: attachment {name!r} cannot be read: {exc.strerror}") from None
        if len(data) > MAX_ATTACHMENT_BYTES:
            raise ConfigError(f"{where}: attachment {name!r} is larger than {MAX_ATTACHMENT_BYTES} bytes")
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        out.append(Attachment(path.name, ctype, data))
    return tuple(out)


def _text_or_file(where: str, base: Path, table: dict[str, Any], key: str) -> str | None:
    if key in table and f"{key}_file" in table:
        raise ConfigError(f"{where}: give {key} or {key}_file, not both")
    if key in table:
        return _str(where, key, table[key])
    if f"{key}_file" in table:
        name = _str(where, f"{key}_file", table[f"{key}_file"])
        try:
            return (base / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: {key}_file {name!r} cannot be read: {exc}") from None
    return None


def load_job(path: str | Path) -> JobConfig:
    """Load and validate ``burst.toml``. Raises :class:`ConfigError` naming the file and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return job_from_dict(data, source=str(path), base=path.parent)


def job_from_dict(data: dict[str, Any], *, source: str, base: Path) -> JobConfig:
    """Build a :class:`JobConfig` from parsed TOML (``source`` names the file in errors)."""
    unknown = set(data) - _JOB_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    group = data.get("group", "consecutive")
    if group not in ("consecutive", "all"):
        raise ConfigError(f"{source}: group must be 'consecutive' or 'all'")
    untagged = data.get("untagged", "continue")
    if untagged not in ("continue", "report"):
        raise ConfigError(f"{source}: untagged must be 'continue' or 'report'")
    tables = data.get("templates", {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{source}: [templates.ID] must be tables")
    templates: dict[str, MessageTemplate] = {}
    for name, table in tables.items():
        where = f"{source}: [templates.{name}]"
        unknown = set(table) - _TEMPLATE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        if "subject" not in table:
            raise ConfigError(f"{where}: subject is required")
        text = _text_or_file(where, base, table, "text")
        if text is None:
            raise ConfigError(f"{where}: text (or text_file) is required")
        tpl = MessageTemplate(
            name=name,
            subject=_str(where, "subject", table["subject"]),
            text=text,
            html=_text_or_file(where, base, table, "html"),
            sender=_str(where, "from", table["from"]) if "from" in table else None,
            reply_to=_str(where, "reply_to", table["reply_to"]) if "reply_to" in table else None,
            filename=_str(where, "filename", table["filename"]) if "filename" in table else None,
            password=_str(where, "password", table["password"]) if "password" in table else None,
            attachments=_attachments(where, base, table.get("attachments", [])),
        )
        for label, src in (("subject", tpl.subject), ("text", tpl.text), ("html", tpl.html)):
            if src is not None:
                try:
                    _environment().from_string(src)
                except jinja2.TemplateSyntaxError as exc:
                    raise ConfigError(f"{where}: {label} line {exc.lineno}: {exc.message}") from None
        templates[name] = tpl
    if not templates:
        templates = dict(default_job().templates)
    return JobConfig(
        sender=_str(source, "from", data["from"]) if "from" in data else None,
        reply_to=_str(source, "reply_to", data["reply_to"]) if "reply_to" in data else None,
        group=group,
        untagged=untagged,
        filename=_str(source, "filename", data.get("filename", DEFAULT_FILENAME)),
        password=_str(source, "password", data["password"]) if "password" in data else None,
        attachments=_attachments(source, base, data.get("attachments", [])),
        templates=templates,
        source=source,
    )


@functools.cache
def _environment() -> jinja2.Environment:
    # Plain-text templates: no autoescape; the HTML body is compiled in an autoescaping environment.
    return jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)  # noqa: S701


@functools.cache
def _html_environment() -> jinja2.Environment:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=True, keep_trailing_newline=True)


@functools.lru_cache(maxsize=256)
def compiled(source: str, *, html: bool = False) -> jinja2.Template:
    """The compiled template for ``source`` (cached per process)."""
    env = _html_environment() if html else _environment()
    return env.from_string(source)
