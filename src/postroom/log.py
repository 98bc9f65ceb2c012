"""Logging set-up and the per-connection logger the protocol adapters use.

Invariants:
- stdlib :mod:`logging` only; every module logs through ``logging.getLogger(__name__)``.
- One line per record on stderr, with the process id (several workers write to the same stream).
- :func:`connection_logger` prefixes each message with the connection id and the peer address, so one
  session's lines can be followed across a busy log. Connection ids are unique within a server run
  (process id + counter). Secrets and message bodies are never logged at INFO.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
TRACE = 5  # below DEBUG: protocol transcripts (passwords and bodies elided by the adapters)
logging.addLevelName(TRACE, "TRACE")

_counter = itertools.count(1)
_pid = os.getpid()  # one getpid() per process, not per connection


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


class LineFormatter(logging.Formatter):
    """Exactly what ``logging.Formatter(FORMAT)`` writes, for less: at INFO an MX logs a line per stored
    message, thousands a second. The date and time part of ``asctime`` (``2026-11-27 12:00:00,123``, local
    time) is built once per second, and a record without a traceback or stack is formatted by one f-string
    instead of the ``%``-style template; one with them goes the standard way."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} [{record.process}] {record.name}: {record.message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


def setup(level: str = "INFO") -> None:
    """Configure the root logger once: ``level`` is a level name (``INFO``, ``DEBUG``, ``TRACE`` …)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (TRACE, DEBUG, INFO, WARNING, ERROR)")
    # FORMAT names no thread and no source line: records need not look up the thread's or the
    # multiprocessing process's name, nor walk the stack for their caller (``_srcfile = None``: the
    # logging HOWTO's "Optimization" section).
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    root.setLevel(numeric)
    if not any(getattr(h, "_postroom", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LineFormatter())
        handler._postroom = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def new_connection_id() -> str:
    """A short id unique within this server run: ``<pid hex>.<counter>``."""
    return f"{_pid:x}.{next(_counter)}"


class ConnectionLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every message with ``[id peer]`` and puts both into the record's ``extra``."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        kwargs.setdefault("extra", {}).update(extra)
        return f"[{extra.get('conn_id', '-')} {extra.get('peer', '-')}] {msg}", kwargs

    def trace(self, msg: str, *args: Any) -> None:
        """Protocol transcript lines (level TRACE)."""
        self.log(TRACE, msg, *args)


def connection_logger(logger: logging.Logger, conn: Any) -> ConnectionLogger:
    """The logger of one connection: ``conn`` is a :class:`postroom.net.connection.Connection`.

    Uses the id the listener gave the connection (``conn.conn_id``) or makes a new one.
    """
    conn_id = getattr(conn, "conn_id", "") or new_connection_id()
    peer = getattr(conn, "peer", ("", 0))
    host, port = (peer[0], peer[1]) if peer else ("", 0)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ConnectionLogger(logger, {"conn_id": conn_id, "peer": where})
