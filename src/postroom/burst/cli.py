"""``postroom burst``: the argparse wiring. ``add_parser`` registers the subcommand, ``run`` executes it.

The password is never an option: ``POSTROOM_SMTP_PASSWORD`` / ``POSTROOM_IMAP_PASSWORD`` /
``POSTROOM_PDF_PASSWORD`` or a prompt.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from postroom.burst.job import Options, run_job
from postroom.burst.transport import PRESETS


def add_parser(subparsers: Any) -> None:
    """Add the ``burst`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "burst",
        help="split a tagged PDF report into one email per recipient and send it",
        description="Split a tagged PDF report (PDF-eXPLODE <pdfexplode> or [[postroom …]] tags) into one "
        "message per recipient with only their pages, and send, save as .eml or as IMAP drafts.",
    )
    configure(p)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("pdf", metavar="FILE.pdf", type=Path, help="the tagged report")
    p.add_argument("--config", type=Path, help="job config (burst.toml): sender, templates, grouping")
    p.add_argument(
        "--out", type=Path, help="output directory for plan, ledger and reports (default: FILE.burst next to the PDF)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="plan, write .eml files and the pre-flight report; connect nowhere"
    )
    p.add_argument("--to-eml", type=Path, metavar="DIR", help="write one .eml file per message instead of sending")
    p.add_argument("--to-drafts", metavar="URL", help="save as drafts via IMAP APPEND: imaps://user@host/Drafts")
    p.add_argument(
        "--transport", metavar="URL", help="smtp+starttls://user@host:587, smtps://user@host:465, smtp://host:25"
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="provider preset: host, port, security, limits")
    p.add_argument("--user", help="login name (for presets; overrides the URL's user)")
    p.add_argument("--check", action="store_true", help="only check the connection, TLS and login; send nothing")
    p.add_argument("--test-to", metavar="ADDR", help="send every message to this one address for approval")
    p.add_argument("--skip-invalid", action="store_true", help="send the valid messages even if some are invalid")
    p.add_argument(
        "--resend-unknown",
        action="store_true",
        help="resend messages an interrupted run may have delivered (risk of duplicates)",
    )
    p.add_argument("--retry-failed", action="store_true", help="retry messages refused with 5xx in an earlier run")
    p.add_argument("--workers", type=int, help="processes for scanning and splitting (default: all cores)")
    p.add_argument("--max-attempts", type=int, help="tries per message on 4xx / lost connection (default 5)")
    p.add_argument("--backoff", type=float, help="seconds before the first retry, doubling (default 2)")
    p.add_argument("--connect-timeout", type=float, help="seconds for connect + TLS + greeting (default 15)")
    p.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")


def run(args: argparse.Namespace) -> int:
    """Run ``postroom burst`` with parsed arguments; returns the exit code."""
    if sum(bool(x) for x in (args.dry_run, args.to_eml, args.to_drafts)) > 1:
        print("error: choose one of --dry-run, --to-eml, --to-drafts")
        return 2
    opts = Options(
        pdf=args.pdf,
        config=args.config,
        out=args.out,
        dry_run=args.dry_run,
        to_eml=args.to_eml,
        to_drafts=args.to_drafts,
        transport=args.transport,
        preset=args.preset,
        user=args.user,
        check_only=args.check,
        test_to=args.test_to,
        skip_invalid=args.skip_invalid,
        resend_unknown=args.resend_unknown,
        retry_failed=args.retry_failed,
        workers=args.workers,
        fancy=False if args.plain else None,
        max_attempts=args.max_attempts,
        backoff=args.backoff,
        connect_timeout=args.connect_timeout,
    )
    return run_job(opts)


def main(argv: list[str] | None = None) -> int:
    """``python -m postroom.burst …``: the same as ``postroom burst …``."""
    p = argparse.ArgumentParser(prog="postroom burst")
    configure(p)
    return run(p.parse_args(argv))
