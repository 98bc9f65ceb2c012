"""The outbound client's core modules are sans-I/O like the protocol cores (house rule)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import postroom

CORES = ("postroom.delivery.wire", "postroom.delivery.dsn")
FORBIDDEN = ("asyncio", "socket", "ssl", "selectors", "postroom.store", "postroom.net", "postroom.app")
ROOT = Path(postroom.__file__).parent


def imports_of(module: str) -> set[str]:
    path = ROOT / (module.removeprefix("postroom.").replace(".", "/") + ".py")
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT / (name.removeprefix("postroom.").replace(".", "/") + ".py")
        if name.startswith("postroom.") and path.exists():
            todo.extend(imports_of(name))
    return seen


@pytest.mark.parametrize("module", CORES)
def test_core_imports_no_io(module: str) -> None:
    bad = sorted(m for m in closure(module) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert bad == [], f"{module} pulls in {bad}"
