"""Postroom: one system that carries an email the whole way.

PDF burst → SMTP submission → durable store and relay queue → POP3 / IMAP.

Some modules may be compiled to C extensions next to their sources (``make native``, ``tools/native.py``).
Invariant: an extension older than its ``.py`` is never run — importing ``postroom`` fails with the fix in
the message instead, since Python would otherwise import the old compiled code and ignore the edited source.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

__version__ = "0.1.0"


def stale_extensions(package: Path) -> list[Path]:
    """The compiled modules under ``package`` whose ``.py`` source is newer than they are."""
    stale = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for ext in package.rglob("*" + suffix):
            source = ext.with_name(ext.name.removesuffix(suffix) + ".py")
            if source.exists() and source.stat().st_mtime > ext.stat().st_mtime:
                stale.append(ext)
    return stale


if _stale := stale_extensions(Path(__file__).parent):
    raise ImportError(
        f"postroom: {len(_stale)} compiled module(s) older than their source, e.g. {_stale[0].name}:"
        " run `make native` to rebuild them, or `make native NATIVE=0` to run the plain Python"
    )
