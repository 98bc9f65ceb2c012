"""The house rule, enforced for every protocol package: cores are sans-I/O.

Every module of ``wire/``, ``smtp/``, ``imap/``, ``pop3/`` and ``mime/`` — found by listing the packages, so
a new module is covered without editing this test — must not import asyncio, socket, ssl, selectors, the
store, the net layer or the App, directly or through another Postroom module. The only exceptions are the
thin asyncio adapters and the maildrop lock file helper, named here.
"""

from __future__ import annotations

import ast
import pkgutil
from functools import cache
from pathlib import Path

import pytest

import postroom

PACKAGES = ("wire", "smtp", "imap", "pop3", "mime")
FORBIDDEN = ("asyncio", "socket", "ssl", "selectors", "postroom.store", "postroom.net", "postroom.app")
#: Modules allowed to do I/O: the adapters, and POP3's flock-based maildrop lock.
IO_MODULES = frozenset(
    {"postroom.smtp.adapter", "postroom.imap.adapter", "postroom.pop3.adapter", "postroom.pop3.lock"}
)
ROOT = Path(postroom.__file__).parent


def _core_modules() -> list[str]:
    names: list[str] = []
    for pkg in PACKAGES:
        for info in pkgutil.iter_modules([str(ROOT / pkg)]):
            name = f"postroom.{pkg}.{info.name}"
            if name not in IO_MODULES:
                names.append(name)
    return sorted(names)


@cache
def _direct_imports(module: str) -> frozenset[str]:
    rel = module.removeprefix("postroom.").replace(".", "/")
    path = ROOT / f"{rel}.py"
    if not path.exists():
        path = ROOT / rel / "__init__.py"
    if not path.exists():
        return frozenset()
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(out)


def _closure(module: str) -> set[str]:
    """Every module imported by ``module``, following Postroom's own modules transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for imp in _direct_imports(current):
            if imp in seen:
                continue
            seen.add(imp)
            if imp.startswith("postroom."):
                todo.append(imp)
    return seen


def test_packages_are_found() -> None:
    modules = _core_modules()
    assert "postroom.smtp.server" in modules and "postroom.imap.core" in modules
    assert "postroom.pop3.core" in modules and "postroom.mime.analyze" in modules


@pytest.mark.parametrize("module", _core_modules())
def test_core_module_is_sans_io(module: str) -> None:
    bad = sorted(imp for imp in _closure(module) if any(imp == f or imp.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"{module} imports {bad} (directly or through another module)"
