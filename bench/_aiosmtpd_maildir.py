"""aiosmtpd delivering into a Maildir with fsync before 250: the peer of ``bench/smtp_throughput.py``.

Run as ``python bench/_aiosmtpd_maildir.py MAILDIR`` — listens on 127.0.0.1 (an ephemeral port), prints
``port N`` when ready, serves until SIGTERM. Each message is written to ``tmp/``, fsynced, renamed into
``new/`` and the directory fsynced, in a thread pool, before the 250 (what Postfix's virtual(8) does).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

_counter = 0


def deliver(maildir: Path, data: bytes) -> None:
    global _counter
    _counter += 1
    name = f"{time.time():.6f}.P{os.getpid()}Q{_counter}.bench"
    tmp = maildir / "tmp" / name
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, maildir / "new" / name)
    fd = os.open(maildir / "new", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildirHandler:
    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data: Any = envelope.original_content or envelope.content
        await asyncio.get_running_loop().run_in_executor(None, deliver, self.maildir, bytes(data))
        return "250 OK"


async def main() -> None:
    maildir = Path(sys.argv[1])
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    handler = MaildirHandler(maildir)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench.test", data_size_limit=0), sock=sock, backlog=1024
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"port {sock.getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
