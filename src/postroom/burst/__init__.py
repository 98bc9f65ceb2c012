"""Burst: split a tagged PDF report into one message per recipient and deliver it.

Pipeline (one module each): :mod:`~postroom.burst.tags` (tag grammar, pure) → :mod:`~postroom.burst.pdf`
(open, scan pages with pypdfium2, split with pikepdf) → :mod:`~postroom.burst.plan` (pages → messages and
the pre-flight problems, pure) → :mod:`~postroom.burst.compose` / :mod:`~postroom.burst.mime` (templates and
MIME) → :mod:`~postroom.burst.produce` (parallel split + compose) → :mod:`~postroom.burst.transport`,
:mod:`~postroom.burst.handoff` (SMTP, .eml, IMAP drafts) with :mod:`~postroom.burst.ledger` (no duplicates)
→ :mod:`~postroom.burst.report`. :mod:`~postroom.burst.job` runs them in order; :mod:`~postroom.burst.cli`
is the ``postroom burst`` command.

Invariants across the package: nothing is delivered before the whole plan is clean and rendered; every
delivery is recorded in the ledger before its data is transmitted; user-facing errors name the file and the
page or template.
"""
