"""The store's reader pool: small reads on the event loop, a busy database sends them to a reader thread."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from postroom.store import sqlite_db as db


async def test_inline_reads_run_on_the_loop_thread_and_fall_back_when_busy(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    conn = db.connect(path)
    db.init_schema(conn)
    conn.close()
    pool = db.ReaderPool(path, 1)
    pool.start()
    try:
        loop_thread = threading.get_ident()
        threads: list[int] = []

        def where(c: sqlite3.Connection) -> int:
            threads.append(threading.get_ident())
            return int(c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0])

        assert await pool.run(where, inline=True) == db.SCHEMA_VERSION
        assert await pool.run(where) == db.SCHEMA_VERSION
        assert threads[0] == loop_thread and threads[1] != loop_thread

        def busy_on_the_loop(c: sqlite3.Connection) -> int:
            if threading.get_ident() == loop_thread:
                exc = sqlite3.OperationalError("database is locked")
                exc.sqlite_errorcode = sqlite3.SQLITE_BUSY
                raise exc
            return where(c)

        threads.clear()
        assert await pool.run(busy_on_the_loop, inline=True) == db.SCHEMA_VERSION
        assert threads and threads[0] != loop_thread  # answered by a reader thread

        def broken(c: sqlite3.Connection) -> None:
            c.execute("SELECT nothing FROM nowhere")

        with pytest.raises(sqlite3.OperationalError):  # other errors are the caller's, not retried
            await pool.run(broken, inline=True)
    finally:
        pool.stop()
