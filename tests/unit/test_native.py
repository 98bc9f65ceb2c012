"""The compiled modules (``make native``, ``tools/native.py``): never older than their source, and really
used where they are required (CI sets ``POSTROOM_REQUIRE_NATIVE=1``)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import postroom

ROOT = Path(__file__).resolve().parents[2]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _native_tool() -> object:
    spec = importlib.util.spec_from_file_location("native_tool", ROOT / "tools" / "native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_extension_older_than_its_source_is_stale(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    source, ext = pkg / "mod.py", pkg / ("mod" + SUFFIX)
    other, other_ext = pkg / "fresh.py", pkg / ("fresh" + SUFFIX)
    c_source, c_ext = pkg / "_hand.c", pkg / ("_hand" + SUFFIX)  # written in C, not compiled by mypyc
    for path in (source, ext, other, other_ext, c_source, c_ext):
        path.write_text("")
    os.utime(ext, (1_000, 1_000))
    os.utime(source, (2_000, 2_000))
    os.utime(other, (1_000, 1_000))
    os.utime(other_ext, (2_000, 2_000))
    os.utime(c_ext, (1_000, 1_000))
    os.utime(c_source, (2_000, 2_000))
    assert sorted(postroom.stale_extensions(tmp_path)) == sorted([ext, c_ext])


def test_a_stale_extension_stops_the_import(tmp_path: Path) -> None:
    """A copy of the package whose (fake) extension is older than its source: ``import postroom`` fails
    with the fix in the message, in a fresh interpreter."""
    pkg = tmp_path / "postroom"
    pkg.mkdir()
    (pkg / "__init__.py").write_text((Path(postroom.__file__)).read_text())
    (pkg / "core.py").write_text("")
    (pkg / ("core" + SUFFIX)).write_text("")
    os.utime(pkg / ("core" + SUFFIX), (1_000, 1_000))
    done = subprocess.run(
        [sys.executable, "-c", "import postroom"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "make native" in done.stderr and "core" + SUFFIX in done.stderr


@pytest.mark.skipif(os.environ.get("POSTROOM_REQUIRE_NATIVE") != "1", reason="POSTROOM_REQUIRE_NATIVE is not 1")
def test_the_listed_modules_run_compiled() -> None:
    tool = _native_tool()
    for path in [*tool.MODULES, *tool.C_EXTENSIONS]:  # type: ignore[attr-defined]
        name = path.rsplit(".", 1)[0].replace("/", ".")
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        assert spec.origin.endswith(SUFFIX), f"{name} runs as plain Python: run `make native`"
