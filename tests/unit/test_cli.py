"""The ``postroom`` command in-process: users, aliases, domains, overrides, extension modules, errors."""

from __future__ import annotations

import argparse
import io
import sys
import types
from pathlib import Path

import pytest

from postroom import cli
from postroom.auth.passwords import verify_password
from postroom.serve import open_configured_store
from postroom.store.api import Account


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "postroom.toml"
    path.write_text(f'hostname = "mx.example.test"\ndata_dir = "{tmp_path / "data"}"\ndomains = ["example.test"]\n')
    return path


def run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *argv: str,
    stdin: str = "",
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def account(conf: Path, address: str) -> Account | None:
    from postroom import config

    store = await open_configured_store(config.load(conf))
    try:
        return await store.get_account(address)
    finally:
        await store.close()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("postroom: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_user_lifecycle(
    conf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    c = str(conf)
    code, out, _ = run(
        capsys,
        monkeypatch,
        "user",
        "add",
        "Bob@Example.Test",
        "--password-stdin",
        "--config",
        c,
        stdin="first secret\n",
    )
    assert code == 0 and out.strip() == "added user bob@example.test"
    code, out, _ = run(capsys, monkeypatch, "user", "list", "--config", c)
    assert out.split() == ["bob@example.test"]

    import asyncio

    acct = asyncio.run(account(conf, "bob@example.test"))
    assert acct is not None and verify_password(acct.password_hash, "first secret")
    assert "first secret" not in acct.password_hash

    code, out, _ = run(
        capsys, monkeypatch, "user", "passwd", "bob@example.test", "--password-stdin", "--config", c, stdin="second\r\n"
    )
    assert code == 0
    acct = asyncio.run(account(conf, "bob@example.test"))
    assert acct is not None and verify_password(acct.password_hash, "second")

    code, _, err = run(
        capsys, monkeypatch, "user", "add", "bob@example.test", "--password-stdin", "--config", c, stdin="x\n"
    )
    assert code == 1 and "exists already" in one_error_line(err)

    code, out, _ = run(capsys, monkeypatch, "user", "del", "BOB@example.test", "--config", c)
    assert code == 0 and "deleted user bob@example.test" in out
    code, out, _ = run(capsys, monkeypatch, "user", "list", "--config", c)
    assert out == ""
    code, _, err = run(capsys, monkeypatch, "user", "del", "bob@example.test", "--config", c)
    assert code == 1 and one_error_line(err) == "postroom: error: no such user bob@example.test"
    code, _, err = run(
        capsys, monkeypatch, "user", "passwd", "bob@example.test", "--password-stdin", "--config", c, stdin="x\n"
    )
    assert code == 1 and "no such user" in one_error_line(err)


@pytest.mark.parametrize(
    "bad",
    [
        "bob",
        "bob@@example.test",
        "bob@",
        "@example.test",
        "bo b@example.test",
        "a..b@example.test",
        "bob@exa_mple.test",
    ],
)
def test_invalid_address_is_one_line(
    conf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    code, out, err = run(
        capsys, monkeypatch, "user", "add", bad, "--password-stdin", "--config", str(conf), stdin="pw\n"
    )
    assert code == 1 and out == ""
    assert one_error_line(err).startswith(f"postroom: error: invalid address {bad!r}")


@pytest.mark.parametrize(
    ("stdin", "why"), [("\n", "empty password"), ("", "empty password"), ("x" * 2000 + "\n", "longer than")]
)
def test_bad_password_input(
    conf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stdin: str, why: str
) -> None:
    code, _, err = run(
        capsys, monkeypatch, "user", "add", "bob@example.test", "--password-stdin", "--config", str(conf), stdin=stdin
    )
    assert code == 1 and why in one_error_line(err)


def test_no_terminal_and_no_password_stdin(
    conf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run(capsys, monkeypatch, "user", "add", "bob@example.test", "--config", str(conf), stdin="pw\n")
    assert code == 1 and "--password-stdin" in one_error_line(err)


def test_user_in_new_domain_adds_the_domain(
    conf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = str(conf)
    code, out, _ = run(
        capsys, monkeypatch, "user", "add", "al@other.test", "--password-stdin", "--config", c, stdin="pw\n"
    )
    assert code == 0
    assert out.splitlines() == ["added local domain other.test", "added user al@other.test"]
    # A user in a config domain does not copy that domain into the store.
    run(capsys, monkeypatch, "user", "add", "bob@example.test", "--password-stdin", "--config", c, stdin="pw\n")
    code, out, _ = run(capsys, monkeypatch, "domain", "list", "--config", c)
    assert out.splitlines() == ["example.test\t(config)", "other.test"]


def test_domains(conf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    c = str(conf)
    code, out, _ = run(capsys, monkeypatch, "domain", "add", "Mail.Example.ORG.", "--config", c)
    assert code == 0 and out.strip() == "added local domain mail.example.org"
    code, out, _ = run(capsys, monkeypatch, "domain", "add", "mail.example.org", "--config", c)
    assert code == 0 and "already" in out
    code, _, err = run(capsys, monkeypatch, "domain", "add", "bad_domain!", "--config", c)
    assert code == 1 and "invalid domain" in one_error_line(err)
    code, out, _ = run(capsys, monkeypatch, "domain", "list", "--config", c)
    assert out.splitlines() == ["example.test\t(config)", "mail.example.org"]


def test_aliases(conf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    c = str(conf)
    run(capsys, monkeypatch, "user", "add", "bob@example.test", "--password-stdin", "--config", c, stdin="pw\n")
    code, _, err = run(capsys, monkeypatch, "alias", "add", "x@example.test", "nobody@example.test", "--config", c)
    assert code == 1 and "no such user nobody@example.test" in one_error_line(err)
    code, _, err = run(capsys, monkeypatch, "alias", "add", "bob@example.test", "bob@example.test", "--config", c)
    assert code == 1 and "is a user already" in one_error_line(err)
    code, out, _ = run(
        capsys, monkeypatch, "alias", "add", "Postmaster@Example.Test", "bob@example.test", "--config", c
    )
    assert code == 0 and out.strip() == "added alias postmaster@example.test -> bob@example.test"
    code, out, _ = run(capsys, monkeypatch, "alias", "add", "bob@alias.test", "bob@example.test", "--config", c)
    assert out.splitlines()[0] == "added local domain alias.test"
    code, out, _ = run(capsys, monkeypatch, "alias", "list", "--config", c)
    assert out.splitlines() == ["bob@alias.test -> bob@example.test", "postmaster@example.test -> bob@example.test"]
    code, out, _ = run(capsys, monkeypatch, "alias", "del", "postmaster@example.test", "--config", c)
    assert code == 0
    code, _, err = run(capsys, monkeypatch, "alias", "del", "postmaster@example.test", "--config", c)
    assert code == 1 and "no such alias" in one_error_line(err)


def test_set_overrides_reach_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "elsewhere"
    code, _, _ = run(capsys, monkeypatch, "domain", "add", "x.test", "--set", f"data_dir={data}")
    assert code == 0 and (data / "store").is_dir()
    args = argparse.Namespace(config=None, set=["smtp.max_recipients=7", 'domains=["a.test"]'])
    cfg = cli.load_config(args)
    assert cfg.smtp.max_recipients == 7 and cfg.domains == ("a.test",)


@pytest.mark.parametrize(
    ("setting", "why"),
    [
        ("nosuch.key=1", "unknown setting"),
        ("smtp.max_recipients", "expected KEY=VALUE"),
        ("smtp.max_recipients=lots", "smtp.max_recipients: expected an integer"),
    ],
)
def test_bad_overrides_are_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, setting: str, why: str
) -> None:
    code, _, err = run(capsys, monkeypatch, "user", "list", "--set", setting)
    assert code == 1 and why in one_error_line(err)


def test_malformed_config_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\nmax_recipients = 1\n")
    code, _, err = run(capsys, monkeypatch, "user", "list", "--config", str(bad))
    assert code == 1 and one_error_line(err).startswith(f"postroom: error: {bad}: not valid TOML")
    code, _, err = run(capsys, monkeypatch, "serve", "--config", str(tmp_path / "missing.toml"))
    assert code == 1 and "no such file" in one_error_line(err)


def test_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    from postroom.config import field_paths

    for path, _ in field_paths():
        assert f"  {path} " in out, path
    assert "2525 stays 2525" in out


def test_extension_modules_add_subcommands(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ext = types.ModuleType("postroom_test_ext")
    calls: list[str] = []

    def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        p = subparsers.add_parser("fakecmd", help="a test command")
        p.add_argument("word")
        subparsers.add_parser("fakeother")

    def run_ext(args: argparse.Namespace) -> int:
        calls.append(f"{args.command}:{getattr(args, 'word', '')}")
        return 3

    ext.add_parser = add_parser  # type: ignore[attr-defined]
    ext.run = run_ext  # type: ignore[attr-defined]
    broken = types.ModuleType("postroom_test_broken")  # imports, but has no add_parser: warned, skipped
    monkeypatch.setitem(sys.modules, "postroom_test_ext", ext)
    monkeypatch.setitem(sys.modules, "postroom_test_broken", broken)
    monkeypatch.setattr(cli, "EXTENSIONS", ("postroom_test_missing", "postroom_test_ext", "postroom_test_broken"))
    assert cli.main(["fakecmd", "hello"]) == 3
    assert cli.main(["fakeother"]) == 3
    assert calls == ["fakecmd:hello", "fakeother:"]
    err = capsys.readouterr().err
    assert "postroom_test_missing" not in err  # missing modules are skipped silently
    assert "postroom_test_broken" in err  # a broken one is named


def test_real_extension_table() -> None:
    assert cli.EXTENSIONS == ("postroom.burst.cli", "postroom.delivery.cli")
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"serve", "user", "alias", "domain"} <= set(sub.choices)
