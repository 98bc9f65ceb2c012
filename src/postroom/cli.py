"""The ``postroom`` command: serve, and manage users, aliases and domains.

Invariants:
- Config overrides (``--set section.key=value``) are derived from :func:`postroom.config.field_paths`;
  nothing is hand-copied from the config into flags.
- Bad input (config, certificate, port, address, password) ends with one ``postroom: error: …`` line on
  stderr and a non-zero exit, never a traceback: :func:`main` catches PostroomError and OSError.
- Passwords never come from the command line: ``--password-stdin`` reads one line, else a terminal prompt.
- Other packages add subcommands through the explicit :data:`EXTENSIONS` table: each module exposes
  ``add_parser(subparsers)`` and ``run(args) -> int``; a missing module is skipped silently, a broken one
  with a warning.
- A user or alias in a domain that is not local yet adds that domain to the store (and says so), because
  mail for an account must be accepted; local domains are the config's ``domains`` plus the store's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import importlib
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from postroom import __version__
from postroom import config as config_mod
from postroom.errors import AlreadyExistsError, ConfigError, NotFoundError, PostroomError
from postroom.store.api import Store
from postroom.wire.address import AddressError, parse_mailbox

T = TypeVar("T")

#: Modules that add their own subcommands: burst (``burst``), delivery (``queue``, ``dkim``).
EXTENSIONS: tuple[str, ...] = ("postroom.burst.cli", "postroom.delivery.cli")

MAX_PASSWORD = 1024  # characters; longer input is a mistake (a file piped by accident), not a password


class UsageError(PostroomError):
    """The command line or its input is wrong; the message says how."""


# -- config ------------------------------------------------------------------------------------------
def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            if f.name == "source":
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value

    walk(config_mod.Config(), "")
    return out


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else "list"


def overrides_help() -> str:
    """The list of every ``--set`` key with its type and default, for ``--help``."""
    defaults = _defaults()
    lines = ['settings for --set KEY=VALUE (VALUE is TOML: 200, true, "text", ["a", "b"]):']
    special = {
        "hostname": "this machine's name",
        "workers": "0 (one per core)",
        "listeners.*": "standard ports as root, else port + 10000 (2525 stays 2525)",
    }
    for path, hint in config_mod.field_paths():
        shown = special.get(path) or special.get(path.split(".")[0] + ".*") or repr(defaults.get(path))
        lines.append(f"  {path:<36} {_type_name(hint):<8} {shown}")
    return "\n".join(lines)


def parse_overrides(items: Sequence[str] | None) -> dict[str, str]:
    known = {path for path, _ in config_mod.field_paths()}
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UsageError(f"--set {item}: expected KEY=VALUE")
        if key not in known:
            raise UsageError(f"--set {key}: unknown setting (postroom serve --help lists them)")
        out[key] = value.strip()
    return out


def load_config(args: argparse.Namespace) -> config_mod.Config:
    """The Config named by ``--config`` / ``--set`` of any subcommand."""
    return config_mod.load(getattr(args, "config", None), parse_overrides(getattr(args, "set", None)))


def _with_store(cfg: config_mod.Config, work: Callable[[Store], Awaitable[T]]) -> T:
    from postroom.serve import open_configured_store

    async def run() -> T:
        try:
            cfg.data_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{cfg.source}: data_dir {cfg.data_dir}: {exc.strerror}") from None
        store = await open_configured_store(cfg)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


# -- input -------------------------------------------------------------------------------------------
def normalize_address(text: str) -> str:
    """``text`` as the account tables key it (lower-cased ``local@domain``); UsageError when invalid."""
    try:
        return parse_mailbox(text.strip(), smtputf8=True).lookup_key
    except AddressError as exc:
        raise UsageError(f"invalid address {text!r}: {exc}") from None


def normalize_domain(text: str) -> str:
    name = text.strip().lower().rstrip(".")
    try:
        return parse_mailbox(f"postmaster@{name}", smtputf8=True).domain
    except AddressError as exc:
        raise UsageError(f"invalid domain {text!r}: {exc}") from None


def read_password(args: argparse.Namespace) -> str:
    """One line from stdin with ``--password-stdin``, else asked twice on the terminal."""
    if args.password_stdin:
        line = sys.stdin.readline(MAX_PASSWORD + 2)
        password = line.removesuffix("\n").removesuffix("\r")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise UsageError("the passwords differ")
    else:
        raise UsageError("no terminal to ask for the password; pipe it in with --password-stdin")
    if not password:
        raise UsageError("empty password")
    if len(password) > MAX_PASSWORD:
        raise UsageError(f"password longer than {MAX_PASSWORD} characters")
    return password


async def _ensure_local_domain(store: Store, cfg: config_mod.Config, domain: str) -> None:
    if cfg.is_local_domain(domain) or domain in await store.list_domains():
        return
    await store.add_domain(domain)
    print(f"added local domain {domain}")


# -- users, aliases, domains ----------------------------------------------------------------------------
def cmd_user_add(args: argparse.Namespace) -> int:
    from postroom.auth.passwords import hash_password

    cfg = load_config(args)
    address = normalize_address(args.address)
    pw_hash = hash_password(read_password(args))

    async def work(store: Store) -> None:
        if await store.get_account(address) is not None:
            raise UsageError(f"user {address} exists already")
        await _ensure_local_domain(store, cfg, address.rpartition("@")[2])
        await store.create_account(address, pw_hash)

    try:
        _with_store(cfg, work)
    except AlreadyExistsError:
        raise UsageError(f"user {address} exists already") from None
    print(f"added user {address}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    async def work(store: Store) -> list[str]:
        return sorted(a.address for a in await store.list_accounts())

    for address in _with_store(load_config(args), work):
        print(address)
    return 0


def cmd_user_del(args: argparse.Namespace) -> int:
    address = normalize_address(args.address)
    try:
        _with_store(load_config(args), lambda store: store.delete_account(address))
    except NotFoundError:
        raise UsageError(f"no such user {address}") from None
    print(f"deleted user {address} and all its mail")
    return 0


def cmd_user_passwd(args: argparse.Namespace) -> int:
    from postroom.auth.passwords import hash_password

    cfg = load_config(args)
    address = normalize_address(args.address)
    pw_hash = hash_password(read_password(args))

    try:  # set_password raises NotFoundError for an unknown address: no separate look-up
        _with_store(cfg, lambda store: store.set_password(address, pw_hash))
    except NotFoundError:
        raise UsageError(f"no such user {address}") from None
    print(f"changed the password of {address}")
    return 0


def cmd_alias_add(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    alias = normalize_address(args.alias)
    target = normalize_address(args.target)

    async def work(store: Store) -> None:
        if await store.get_account(target) is None:
            raise UsageError(f"no such user {target} (an alias points to an account)")
        if await store.get_account(alias) is not None:
            raise UsageError(f"{alias} is a user already")
        await _ensure_local_domain(store, cfg, alias.rpartition("@")[2])
        await store.add_alias(alias, target)

    try:
        _with_store(cfg, work)
    except AlreadyExistsError:
        raise UsageError(f"alias {alias} exists already") from None
    print(f"added alias {alias} -> {target}")
    return 0


def cmd_alias_list(args: argparse.Namespace) -> int:
    for alias, target in sorted(_with_store(load_config(args), lambda store: store.list_aliases())):
        print(f"{alias} -> {target}")
    return 0


def cmd_alias_del(args: argparse.Namespace) -> int:
    alias = normalize_address(args.alias)
    try:
        _with_store(load_config(args), lambda store: store.remove_alias(alias))
    except NotFoundError:
        raise UsageError(f"no such alias {alias}") from None
    print(f"deleted alias {alias}")
    return 0


def cmd_domain_add(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    domain = normalize_domain(args.domain)

    async def work(store: Store) -> bool:
        if domain in await store.list_domains():
            return False
        await store.add_domain(domain)
        return True

    added = _with_store(cfg, work)
    print(f"added local domain {domain}" if added else f"{domain} is a local domain already")
    return 0


def cmd_domain_list(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    stored = _with_store(cfg, lambda store: store.list_domains())
    for domain in cfg.domains:
        print(f"{domain}\t(config)")
    for domain in sorted(set(stored) - set(cfg.domains)):
        print(domain)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from postroom.serve import serve

    return serve(load_config(args))


# -- the parser ----------------------------------------------------------------------------------------
def _config_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML config file (default: built-in defaults)")
    common.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        help="override one setting, e.g. smtp.max_recipients=200 (repeatable)",
    )
    return common


def _table(
    parent: Any,
    name: str,
    help_text: str,
    commands: Sequence[tuple[str, str, Callable[[argparse.Namespace], int], Sequence[str]]],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``name`` with sub-subcommands from an explicit (verb, help, function, positionals) table."""
    group = parent.add_parser(name, help=help_text)
    verbs = group.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    for verb, verb_help, func, positionals in commands:
        p = verbs.add_parser(verb, help=verb_help, parents=[common])
        for pos in positionals:
            p.add_argument(pos)
        if func in (cmd_user_add, cmd_user_passwd):
            p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        p.set_defaults(_run=func)


def _add_extensions(sub: Any) -> None:
    for module_name in EXTENSIONS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                continue
            print(f"postroom: warning: {module_name} failed to load: {exc}", file=sys.stderr)
            continue
        except Exception as exc:
            print(f"postroom: warning: {module_name} failed to load: {exc}", file=sys.stderr)
            continue
        before = set(sub.choices)
        try:
            module.add_parser(sub)
            run = module.run
        except Exception as exc:
            print(f"postroom: warning: {module_name} cannot add its commands: {exc}", file=sys.stderr)
            continue
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(_run=run)


#: This module's own commands; running one of them does not import the extension modules (they are heavy).
BUILTIN = frozenset({"serve", "user", "alias", "domain"})


def build_parser(with_extensions: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postroom", description="Postroom: burst PDFs, and serve SMTP, POP3 and IMAP."
    )
    parser.add_argument("--version", action="version", version=f"postroom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _config_options()
    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run the mail server",
        description="Run every configured listener until SIGTERM (SIGHUP reloads the certificate).",
        epilog=overrides_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.set_defaults(_run=cmd_serve)
    _table(
        sub,
        "user",
        "manage mail accounts",
        [
            ("add", "add an account (password from --password-stdin)", cmd_user_add, ["address"]),
            ("list", "list the accounts", cmd_user_list, []),
            ("del", "delete an account and all its mail", cmd_user_del, ["address"]),
            ("passwd", "change an account's password", cmd_user_passwd, ["address"]),
        ],
        common,
    )
    _table(
        sub,
        "alias",
        "manage aliases (other addresses of an account)",
        [
            ("add", "add ALIAS delivering to the account TARGET", cmd_alias_add, ["alias", "target"]),
            ("list", "list the aliases", cmd_alias_list, []),
            ("del", "delete an alias", cmd_alias_del, ["alias"]),
        ],
        common,
    )
    _table(
        sub,
        "domain",
        "manage local domains (besides the config's domains)",
        [
            ("add", "add a local domain", cmd_domain_add, ["domain"]),
            ("list", "list the local domains", cmd_domain_list, []),
        ],
        common,
    )
    if with_extensions:
        _add_extensions(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(with_extensions=command not in BUILTIN).parse_args(argv)
    try:
        return int(args._run(args))
    except BrokenPipeError:
        return 1
    except (PostroomError, OSError) as exc:
        print(f"postroom: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
