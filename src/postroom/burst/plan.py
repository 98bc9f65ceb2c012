"""Turn the tags found on each page into a plan: which pages go to whom, and what is wrong.

Pure: no PDF, no I/O. Input is one :class:`PageScan` per page, output a :class:`Plan`.

Invariants:
- Page numbers are 1-based everywhere the user sees them; every problem names its page.
- A page belongs to at most one message. Pages with an explicit empty tag go to nobody and end the
  current document; untagged pages continue the previous tag (``untagged="continue"``) or are problems
  (``untagged="report"``). Untagged pages before the first tag go to nobody (a cover page) with a warning.
- Grouping key is the envelope (to, cc, bcc) plus the template. ``group="consecutive"`` starts a new
  message whenever the key changes; ``group="all"`` gathers every page with the same key into the first
  message that had it. The first tag of a message provides its variables; a later tag in the same message
  with different values is a warning, never silently mixed.
- ``Plan.errors`` non-empty means the job must not send (unless the user skips the invalid messages:
  :meth:`Plan.without_invalid`). A message is invalid if any of its pages has an error.
- :attr:`PlannedMessage.key` is stable: the same recipients, template and pages give the same key on every
  run, whatever the template texts say; the ledger and the Message-ID are derived from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from postroom.burst.jobconfig import DEFAULT_TEMPLATE, GroupMode, UntaggedMode
from postroom.burst.tags import Tag


@dataclass(frozen=True, slots=True)
class PageScan:
    """What the scanner found on one page (``page`` is 1-based). ``error`` is a malformed tag."""

    page: int
    tags: tuple[Tag, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Problem:
    """One line of the pre-flight report. ``page`` 0 means the whole document."""

    page: int
    severity: Literal["error", "warning"]
    text: str

    def __str__(self) -> str:
        where = f"page {self.page}" if self.page else "document"
        return f"{self.severity}: {where}: {self.text}"


@dataclass(frozen=True, slots=True)
class PlannedMessage:
    """One message to send: its tag (the first of its pages), its pages and its stable key."""

    seq: int
    tag: Tag
    pages: tuple[int, ...]
    key: str
    invalid: bool = False

    @property
    def template(self) -> str:
        return self.tag.template or DEFAULT_TEMPLATE

    @property
    def page_text(self) -> str:
        """``"3-5, 9"``: the pages as a person writes them."""
        return format_pages(self.pages)


@dataclass(frozen=True, slots=True)
class Plan:
    """Messages in order of their first page, the problems, and the pages that go to nobody."""

    page_count: int
    messages: tuple[PlannedMessage, ...]
    problems: tuple[Problem, ...]
    unsent_pages: tuple[int, ...]

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    def without_invalid(self) -> Plan:
        """The plan with every invalid message dropped (``--skip-invalid``)."""
        keep = tuple(m for m in self.messages if not m.invalid)
        dropped = tuple(p for m in self.messages if m.invalid for p in m.pages)
        return replace(self, messages=keep, unsent_pages=tuple(sorted(self.unsent_pages + dropped)))

    def with_problems(self, extra: Sequence[Problem], invalid_keys: Collection[str]) -> Plan:
        """Add problems found later (template rendering) and mark the messages they concern invalid."""
        msgs = tuple(replace(m, invalid=True) if m.key in invalid_keys else m for m in self.messages)
        probs = tuple(sorted((*self.problems, *extra), key=lambda p: (p.page, p.severity)))
        return replace(self, messages=msgs, problems=probs)


def format_pages(pages: Sequence[int]) -> str:
    """``[3, 4, 5, 9]`` → ``"3-5, 9"``."""
    out: list[str] = []
    i = 0
    while i < len(pages):
        j = i
        while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
            j += 1
        out.append(str(pages[i]) if i == j else f"{pages[i]}-{pages[j]}")
        i = j + 1
    return ", ".join(out)


def message_key(tag: Tag, pages: Sequence[int]) -> str:
    """The stable identity of a message: envelope, template and pages (hex SHA-256, 32 chars)."""
    text = "\n".join(
        [
            ",".join(a.lower() for a in tag.to),
            ",".join(a.lower() for a in tag.cc),
            ",".join(a.lower() for a in tag.bcc),
            tag.template or DEFAULT_TEMPLATE,
            ",".join(map(str, pages)),
        ]
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _group_key(tag: Tag) -> tuple[object, ...]:
    return (
        tuple(a.lower() for a in tag.to),
        tuple(a.lower() for a in tag.cc),
        tuple(a.lower() for a in tag.bcc),
        tag.template or DEFAULT_TEMPLATE,
    )


@dataclass(slots=True)
class _Group:
    tag: Tag
    first_page: int
    pages: list[int]
    invalid: bool = False


def make_plan(
    scans: Sequence[PageScan],
    *,
    group: GroupMode = "consecutive",
    untagged: UntaggedMode = "continue",
    templates: Collection[str] = (DEFAULT_TEMPLATE,),
    max_recipients: int | None = None,
) -> Plan:
    """Plan the job. ``templates`` are the message ids the job config defines."""
    problems: list[Problem] = []
    groups: list[_Group] = []
    by_key: dict[tuple[object, ...], _Group] = {}
    current: _Group | None = None  # the group untagged pages continue; None after an empty tag
    seen_tag = False
    unsent: list[int] = []

    for scan in sorted(scans, key=lambda s: s.page):
        page = scan.page
        if scan.error is not None:
            problems.append(Problem(page, "error", scan.error))
            # The page's owner is unknown: it joins nobody, and its continuation pages join nobody either.
            current = _Group(Tag("native"), page, [page], invalid=True)
            groups.append(current)
            seen_tag = True
            continue
        tags = _distinct(scan.tags)
        if len(tags) > 1:
            listed = "; ".join(t.raw or ",".join(t.to) for t in tags)
            problems.append(Problem(page, "error", f"{len(tags)} different tags on one page: {listed}"))
            current = _Group(tags[0], page, [page], invalid=True)
            groups.append(current)
            seen_tag = True
            continue
        if not tags:
            if current is None:
                unsent.append(page)
                if not seen_tag:
                    problems.append(Problem(page, "warning", "no tag before this page; it is not sent"))
            elif untagged == "report":
                problems.append(Problem(page, "error", "page has no tag (untagged pages are reported)"))
                unsent.append(page)
            else:
                current.pages.append(page)
            continue
        tag = tags[0]
        seen_tag = True
        if tag.is_empty:
            unsent.append(page)
            current = None
            continue
        invalid = False
        name = tag.template or DEFAULT_TEMPLATE
        if name not in templates:
            hint = f"message id {tag.template!r}" if tag.template else "no message id and no default template"
            problems.append(Problem(page, "error", f"{hint}: no such template in the job config"))
            invalid = True
        if max_recipients is not None and len(tag.recipients) > max_recipients:
            problems.append(
                Problem(
                    page,
                    "error",
                    f"{len(tag.recipients)} recipients (to+cc+bcc); the provider allows {max_recipients}",
                )
            )
            invalid = True
        key = _group_key(tag)
        if current is not None and not current.invalid and _group_key(current.tag) == key:
            target: _Group | None = current
        elif group == "all":
            target = by_key.get(key)
        else:
            target = None
        if target is None:
            target = _Group(tag, page, [], invalid=invalid)
            groups.append(target)
            by_key.setdefault(key, target)
        else:
            target.invalid = target.invalid or invalid
            if tag.variables != target.tag.variables or tag.subject != target.tag.subject:
                problems.append(
                    Problem(
                        page,
                        "warning",
                        f"tag values differ from page {target.first_page}'s tag for the same recipient; "
                        f"the message uses page {target.first_page}'s values",
                    )
                )
        target.pages.append(page)
        current = target

    messages: list[PlannedMessage] = []
    for g in groups:
        pages = tuple(sorted(g.pages))
        messages.append(PlannedMessage(len(messages) + 1, g.tag, pages, message_key(g.tag, pages), g.invalid))
    if not any(s.tags or s.error for s in scans):
        problems.append(Problem(0, "error", "no tags found in the document (is it the tagged report?)"))
    problems.sort(key=lambda p: (p.page, p.severity))
    return Plan(len(scans), tuple(messages), tuple(problems), tuple(sorted(unsent)))


def _distinct(tags: Sequence[Tag]) -> list[Tag]:
    out: list[Tag] = []
    for t in tags:
        if not any(t.same_message(o) for o in out):
            out.append(t)
    return out
