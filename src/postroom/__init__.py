"""Postroom: one system that carries an email the whole way.

PDF burst → SMTP submission → durable store and relay queue → POP3 / IMAP.

Some modules may be compiled to C extensions next to their sources (``make native``, ``tools/native.py``).
Invariant: an extension older than its ``.py`` is never run — importing ``postroom`` fails with the fix in
the message instead, since Python would otherwise import the old compiled code and ignore the edited source.
"""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

__version__ = "0.1.0"


def stale_extensions(package: Path) -> list[Path]:
    """The compiled modules under ``package`` whose ``.py`` (mypyc) or ``.c`` source is newer than they are.
    One walk of the tree (it runs at every start of every process), ``__pycache__`` left out."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    stale = []
    for folder, dirs, files in os.walk(package):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(suffixes):
                ext = os.path.join(folder, name)
                for source in (os.path.join(folder, name.split(".", 1)[0] + s) for s in (".py", ".c")):
                    if os.path.exists(source) and os.stat(source).st_mtime > os.stat(ext).st_mtime:
                        stale.append(Path(ext))
                        break
    return stale


if _stale := stale_extensions(Path(__file__).parent):
    raise ImportError(
        f"postroom: {len(_stale)} compiled module(s) older than their source, e.g. {_stale[0].name}:"
        " run `make native` to rebuild them, or `make native NATIVE=0` to run the plain Python"
    )
