"""Domains, accounts and aliases of the embedded store (mixed into :class:`~postroom.store.sqlite.SqliteStore`).

Invariants: addresses are stored lower-cased; creating an account creates its DEFAULT_MAILBOXES in the same
transaction; deleting one removes its mailboxes, messages (releasing shared bytes) and the aliases pointing
to it, in one transaction.
"""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING, Any

from postroom.errors import AlreadyExistsError, NotFoundError
from postroom.store import sqlite_db as db
from postroom.store.api import DEFAULT_MAILBOXES, Account


class AccountsMixin:
    """Account operations; relies on SqliteStore's ``_read``/``_write`` and mailbox helpers."""

    if TYPE_CHECKING:  # provided by SqliteStore

        async def _read(self, fn: Any, on_loop: bool = False) -> Any: ...

        async def _write(self, fn: db.WriteFn, prepare: Any = None) -> Any: ...

        def _create_mailbox_tx(self, c: sqlite3.Connection, account_id: int, name: str, special: str | None) -> int: ...

        def _drop_mailbox_tx(self, c: sqlite3.Connection, mb_id: int, t: db.Touched) -> None: ...

    async def add_domain(self, name: str) -> None:
        await self._write(lambda c, t: c.execute("INSERT OR IGNORE INTO domains VALUES(?)", (name.lower(),)))

    async def list_domains(self) -> list[str]:
        rows = await self._read(lambda c: c.execute("SELECT name FROM domains ORDER BY name").fetchall())
        return [r[0] for r in rows]

    async def create_account(self, address: str, password_hash: str) -> Account:
        address = address.lower()

        def tx(c: sqlite3.Connection, t: db.Touched) -> Account:
            try:
                cur = c.execute(
                    "INSERT INTO accounts(address, password_hash, created) VALUES(?,?,?)",
                    (address, password_hash, time.time()),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExistsError(f"account {address} exists") from None
            assert cur.lastrowid is not None
            for name, special in DEFAULT_MAILBOXES:
                self._create_mailbox_tx(c, cur.lastrowid, name, special)
            t.accounts.add(cur.lastrowid)
            return Account(cur.lastrowid, address, password_hash)

        result: Account = await self._write(tx)
        return result

    async def delete_account(self, address: str) -> None:
        address = address.lower()

        def tx(c: sqlite3.Connection, t: db.Touched) -> None:
            row = c.execute("SELECT id FROM accounts WHERE address=?", (address,)).fetchone()
            if row is None:
                raise NotFoundError(f"no account {address}")
            for (mb_id,) in c.execute("SELECT id FROM mailboxes WHERE account_id=?", (row[0],)).fetchall():
                self._drop_mailbox_tx(c, mb_id, t)
            c.execute("DELETE FROM accounts WHERE id=?", (row[0],))
            c.execute("DELETE FROM aliases WHERE target=?", (address,))
            t.accounts.add(row[0])

        await self._write(tx)

    async def get_account(self, address: str) -> Account | None:
        row = await self._read(
            lambda c: c.execute(
                "SELECT id, address, password_hash FROM accounts WHERE address=?", (address.lower(),)
            ).fetchone(),
            on_loop=True,  # one primary-key row: cheaper than the hop to a reader thread (LOGIN, AUTH)
        )
        return Account(*row) if row else None

    async def list_accounts(self) -> list[Account]:
        rows = await self._read(
            lambda c: c.execute("SELECT id, address, password_hash FROM accounts ORDER BY address").fetchall()
        )
        return [Account(*r) for r in rows]

    async def set_password(self, address: str, password_hash: str) -> None:
        def tx(c: sqlite3.Connection, t: db.Touched) -> None:
            cur = c.execute("UPDATE accounts SET password_hash=? WHERE address=?", (password_hash, address.lower()))
            if cur.rowcount == 0:
                raise NotFoundError(f"no account {address}")

        await self._write(tx)

    async def add_alias(self, alias: str, target: str) -> None:
        await self._write(
            lambda c, t: c.execute("INSERT OR REPLACE INTO aliases VALUES(?,?)", (alias.lower(), target.lower()))
        )

    async def remove_alias(self, alias: str) -> None:
        def tx(c: sqlite3.Connection, t: db.Touched) -> None:
            if c.execute("DELETE FROM aliases WHERE alias=?", (alias.lower(),)).rowcount == 0:
                raise NotFoundError(f"no alias {alias}")

        await self._write(tx)

    async def list_aliases(self) -> list[tuple[str, str]]:
        rows = await self._read(lambda c: c.execute("SELECT alias, target FROM aliases ORDER BY alias").fetchall())
        return [(r[0], r[1]) for r in rows]

    async def resolve(self, address: str) -> Account | None:
        def q(c: sqlite3.Connection) -> Any:
            addr = address.lower()
            for _ in range(5):  # alias chains are short; bound them against loops
                row = c.execute("SELECT id, address, password_hash FROM accounts WHERE address=?", (addr,)).fetchone()
                if row:
                    return row
                alias = c.execute("SELECT target FROM aliases WHERE alias=?", (addr,)).fetchone()
                if alias is None:
                    return None
                addr = alias[0]
            return None

        row = await self._read(q, on_loop=True)  # at most 10 primary-key look-ups (RCPT TO, MAIL FROM)
        return Account(*row) if row else None
