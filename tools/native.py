"""Compile Postroom's hottest pure-Python modules to C extensions with mypyc: ``make native``.

Why: the SMTP session and its parsing, the parse-once analysis of every stored message and the store's
group-commit writer are plain Python code that runs for every message; compiled by mypyc from the same
typed source (``mypy --strict`` clean) the parsing and analysis cost a third less CPU, the session
answers more messages per second at 20 connections, and the writer holds the interpreter lock for less
time (measured: ``docs/benchmarks.md``, SMTP throughput). The other modules stay Python.

Invariants:
- The ``.py`` source is the truth. Every module in :data:`MODULES` works, and is tested, as plain Python;
  ``build`` puts a C extension of each next to its source (``src/postroom/.../NAME.cpython-*.so``, plus
  mypyc's shared runtime library in ``src/``), which Python then imports instead of the source.
- A build is all or nothing: the extensions call each other directly, so a failed build removes every
  one of them and Postroom runs as plain Python (``build`` still exits 0 and says so in one line, unless
  ``POSTROOM_REQUIRE_NATIVE=1``, as in CI).
- An extension older than its source is never used: ``postroom`` refuses to import
  (:func:`postroom.stale_extensions`), and ``build`` rebuilds when any source is newer than any extension.

Usage: ``python tools/native.py build | clean | status`` (``make native``, ``make native NATIVE=0``).
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
BUILD = ROOT / "build" / "native"  # mypyc's C sources, object files and mypy cache (not in git)
#: Compiled together, as one group (cross-module calls between them are direct C calls).
MODULES = (
    "postroom/smtp/server.py",
    "postroom/smtp/commands.py",
    "postroom/smtp/events.py",
    "postroom/smtp/policy.py",
    "postroom/smtp/submission.py",
    "postroom/smtp/trace.py",
    "postroom/wire/address.py",
    "postroom/wire/linebuffer.py",
    "postroom/wire/dotstuff.py",
    "postroom/wire/replies.py",
    "postroom/mime/analyze.py",
    "postroom/mime/headers.py",
    "postroom/store/sqlite_db.py",
    "postroom/net/served.py",
    "postroom/smtp/adapter.py",
)
#: Written in C by hand, built in the same step: source → the libraries it links. ``_sqlite_fast`` (the
#: append commit without the GIL, :mod:`postroom.store.sqlite_native`) needs SQLite's headers.
C_EXTENSIONS = {"postroom/store/_sqlite_fast.c": ["sqlite3"]}
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # e.g. .cpython-311-x86_64-linux-gnu.so

SETUP = """
import json
import sys
from setuptools import Extension, setup
from mypyc.build import mypycify
build, c_extensions, *paths = sys.argv[1:]
handwritten = [
    Extension(src.removesuffix(".c").replace("/", "."), [src], libraries=libs, extra_compile_args=["-O2"])
    for src, libs in json.loads(c_extensions).items()
]
setup(
    name="postroom-native",
    ext_modules=mypycify(paths, opt_level="3", target_dir=build + "/c") + handwritten,
    script_args=["build_ext", "--inplace", "--build-temp", build + "/temp", "--build-lib", build + "/lib"],
)
"""


def extensions() -> list[Path]:
    """Every compiled file in the source tree (the modules' and mypyc's shared runtime library)."""
    return sorted(p for p in SRC.rglob("*" + SUFFIX) if p.is_file())


def up_to_date() -> bool:
    """Exactly the modules of :data:`MODULES` and :data:`C_EXTENSIONS` are compiled (a module dropped from
    the lists must not keep running compiled), and none of their sources is newer than any extension."""
    exts = extensions()
    have = {p.relative_to(SRC).as_posix().removesuffix(SUFFIX) for p in exts if p.parent != SRC}
    sources = [*MODULES, *C_EXTENSIONS]
    if have != {m.rsplit(".", 1)[0] for m in sources}:
        return False
    oldest = min(p.stat().st_mtime for p in exts)
    return all((SRC / m).stat().st_mtime <= oldest for m in sources)


def clean() -> None:
    for p in extensions():
        p.unlink()


def build() -> int:
    if up_to_date():
        print("native: the compiled modules are up to date")
        return 0
    clean()
    BUILD.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MYPY_CACHE_DIR": str(BUILD / "mypy_cache")}
    print(
        f"native: compiling {len(MODULES)} modules with mypyc and {len(C_EXTENSIONS)} in C (under a minute)", flush=True
    )
    done = subprocess.run(
        [sys.executable, "-c", SETUP, str(BUILD), json.dumps(C_EXTENSIONS), *MODULES],
        cwd=SRC,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode == 0:
        # setuptools copies each module's small shim with the time of its last rebuild, and an edited
        # module's shim is not rebuilt (only the shared library is): date this build's outputs now.
        for p in extensions():
            os.utime(p)
    if done.returncode == 0 and up_to_date():
        print(f"native: {len(MODULES) + len(C_EXTENSIONS)} modules compiled")
        return 0
    clean()
    (BUILD / "last-error.log").write_text(done.stdout + done.stderr)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if ": error" in line or line.startswith("error:")]  # mypy, gcc, setuptools
    why = (errors or lines[-1:] or ["no output"])[0]
    print(f"native: mypyc build failed ({why}; log in build/native/last-error.log): Postroom runs as plain Python")
    return 1 if os.environ.get("POSTROOM_REQUIRE_NATIVE") == "1" else 0


def remove() -> int:
    clean()
    shutil.rmtree(BUILD, ignore_errors=True)
    print("native: removed; Postroom runs as plain Python")
    return 0


def status() -> int:
    exts = extensions()
    state = "up to date" if exts and up_to_date() else "stale" if exts else "not built (plain Python)"
    print(f"native: {state}; {len(exts)} compiled files")
    return 0


def main(argv: list[str]) -> int:
    commands = {"build": build, "clean": remove, "status": status}
    if len(argv) != 1 or argv[0] not in commands:
        print(__doc__.rsplit("Usage: ", 1)[1].strip(), file=sys.stderr)
        return 2
    return commands[argv[0]]()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
