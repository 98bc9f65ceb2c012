"""The asyncio adapter of the POP3 server: runs a :class:`~postroom.pop3.core.Pop3Session` over a Connection.

It only moves bytes and does what the core's events ask (check a password, lock and load the maildrop,
read a message, remove messages at QUIT, start TLS). Protocol decisions all live in the core.

Invariants:
- The maildrop lock (:mod:`postroom.pop3.lock`) is released on every exit path (QUIT, EOF, idle timeout,
  TLS failure, cancellation, our own bug): one ``try/finally`` around the whole session.
- Messages are removed only when the core emits ``Update`` (QUIT in TRANSACTION). EOF, a timeout or an
  error ends the session with nothing removed (RFC 1939 §6).
- Replies are written in command order and flushed when the core needs more input or its output passes
  :data:`FLUSH_AT`; ``drain`` bounds memory for slow readers.
- After STLS the Connection and the core both discard buffered plaintext (RFC 2595 §3.1).
- ``\\Seen`` is set on RETR only when ``[pop3] mark_seen_on_retr`` is on (the seed: no shared read state).
- Per-IP and total connection limits are enforced by the listener (``postroom.net.server``) before this runs.
"""

from __future__ import annotations

import asyncio
import logging

from postroom.app import App, ListenerSpec
from postroom.errors import NotFoundError, StoreError
from postroom.log import TRACE, connection_logger
from postroom.net.connection import Connection
from postroom.net.server import shutdown_event
from postroom.pop3.core import Pop3Session
from postroom.pop3.events import (
    Authenticate,
    Close,
    MaildropEntry,
    NeedData,
    Retrieve,
    StartTls,
    Update,
)
from postroom.pop3.lock import MaildropLock
from postroom.pop3.maildrop import Maildrop, MaildropCache
from postroom.pop3.parser import redact

log = logging.getLogger(__name__)

FLUSH_AT = 128 * 1024  # octets of pending replies after which the adapter writes before the next command
READ_SIZE = 65536  # octets per read from the connection
SEEN = ("\\Seen",)
INTERNAL_ERROR = b"-ERR [SYS/TEMP] Internal server error, closing connection\r\n"  # RFC 3206 §4
SHUTTING_DOWN = b"-ERR [SYS/TEMP] Server shutting down, try again later\r\n"  # RFC 3206 §4


async def handle(conn: Connection, app: App, spec: ListenerSpec) -> None:
    """Serve one POP3 connection (``pop3``: plaintext + STLS; ``pop3s``: TLS already up)."""
    cfg = app.config
    clog = connection_logger(log, conn)
    session = Pop3Session(
        cfg.pop3,
        hostname=cfg.hostname,
        tls_active=conn.is_tls,
        stls_available=spec.tls == "starttls",
        plaintext_ok=cfg.auth.allow_plaintext_on_loopback and conn.is_loopback,
    )
    ip = conn.peer[0]
    store = app.store
    mark_seen = cfg.pop3.mark_seen_on_retr
    timeout = cfg.pop3.idle_timeout
    tracing = clog.isEnabledFor(TRACE)  # transcripts without passwords or message bodies
    lock: MaildropLock | None = None
    mailbox_id = 0
    # Graceful shutdown: a session waiting for its next command says goodbye at once (nothing removed);
    # one busy with a command finishes it first and says goodbye before reading again.
    stopping = shutdown_event(app)
    idle = False

    def on_stop(waiter: asyncio.Future[object]) -> None:
        if idle and not waiter.cancelled():
            conn.write(SHUTTING_DOWN)
            conn.close()
            # A TLS close waits for the peer's close_notify before connection_lost; end our read now.
            conn.eof_received()

    stop_waiter: asyncio.Future[object] = asyncio.ensure_future(stopping.wait())
    stop_waiter.add_done_callback(on_stop)
    try:
        while True:
            event = session.next_event()
            if type(event) is NeedData:
                out = session.data_to_send()
                if out:
                    if tracing:
                        clog.trace("S: %s (%d octets)", out[: out.find(b"\r\n")].decode("ascii", "replace"), len(out))
                    conn.write(out)
                    await conn.drain()
                if stopping.is_set():
                    conn.write(SHUTTING_DOWN)
                    return
                idle = True
                try:
                    data = await conn.read(READ_SIZE, timeout=timeout)
                except TimeoutError:
                    clog.info("idle timeout after %.0f s; nothing removed", timeout)  # RFC 1939 §3
                    return
                finally:
                    idle = False
                if not data:
                    if session.username:
                        clog.info("%s disconnected without QUIT; nothing removed", session.username)
                    return
                if tracing:
                    clog.trace("C: %s", redact(data, session.in_sasl))
                session.receive_data(data)
            elif type(event) is Retrieve:
                try:
                    raw = await store.read(event.blob_id)
                except StoreError as exc:
                    if not isinstance(exc, NotFoundError):  # NotFound: expunged meanwhile (e.g. over IMAP)
                        clog.exception("reading message %d failed", event.uid)
                    session.message_unavailable()
                else:
                    session.message(raw)
                    if mark_seen and event.lines is None:
                        try:
                            await store.set_flags(mailbox_id, (event.uid,), "add", SEEN)
                        except StoreError:  # the message went out already; \Seen is only advisory here
                            clog.exception("setting \\Seen on message %d failed", event.uid)
                if session.pending_output >= FLUSH_AT:
                    conn.write(session.data_to_send())
                    await conn.drain()
            elif type(event) is Authenticate:
                lock, mailbox_id = await _login(session, event, app, ip, clog)
            elif type(event) is Update:
                ok = True
                removed: list[int] = []
                try:
                    removed = await store.delete_messages(mailbox_id, event.uids)
                except StoreError:
                    clog.exception("removing %d messages failed", len(event.uids))
                    ok = False
                clog.info("%s QUIT: %d messages removed", session.username, len(removed))
                session.update_result(len(removed), ok)
                if lock is not None:  # released before the goodbye, so the client's next login finds it free
                    lock.release()
                await _flush(conn, session)
                return
            elif type(event) is StartTls:
                await _flush(conn, session)
                try:
                    await conn.start_tls(app.tls, timeout=cfg.net.tls_handshake_timeout)
                except (OSError, TimeoutError, ConnectionError) as exc:
                    clog.info("STLS handshake failed: %s", exc)
                    session.tls_failed()
                    return
                session.tls_started()
            else:
                assert type(event) is Close
                if lock is not None:
                    lock.release()
                await _flush(conn, session)
                return
    except (ConnectionError, TimeoutError):
        return  # the peer went away (or a write timed out): nothing to say, nothing removed
    except Exception:
        # Our bug (STYLE: an unexpected exception becomes -ERR and is logged with its traceback). Replies
        # are written whole, so this lands on a reply boundary. CancelledError is not an Exception.
        clog.exception("POP3 session failed")
        conn.write(INTERNAL_ERROR)
    finally:
        stop_waiter.cancel()
        if lock is not None:
            lock.release()


def _cache(app: App) -> MaildropCache:
    """This worker's maildrop listing cache (one per App, i.e. per process)."""
    cache = app.extras.get("pop3.maildrops")
    if not isinstance(cache, MaildropCache):
        cache = app.extras["pop3.maildrops"] = MaildropCache()
    return cache


async def _flush(conn: Connection, session: Pop3Session) -> None:
    out = session.data_to_send()
    if out:
        conn.write(out)
        await conn.drain()


async def _login(
    session: Pop3Session, event: Authenticate, app: App, ip: str, clog: logging.LoggerAdapter[logging.Logger]
) -> tuple[MaildropLock | None, int]:
    """Check the credentials, lock and load the maildrop; tell the core the outcome."""
    account = await app.auth.authenticate(event.username, event.password, ip)
    if account is None or (event.authzid and event.authzid.strip().lower() != account.address):
        session.login_failed()  # no proxy authorization: a foreign authzid fails like a bad password
        return None, 0
    lock = MaildropLock.acquire(app.config.data_path / "run", account.id)
    if lock is None:
        clog.info("%s: maildrop in use", account.address)
        session.login_in_use()
        return None, 0
    delay = app.config.pop3.login_delay
    if delay > 0:
        if lock.seconds_since_last_login() < delay:  # RFC 2449 §6.8: advertised and enforced
            lock.release()
            clog.info("%s: login refused, LOGIN-DELAY %d s not over", account.address, delay)
            session.login_too_soon()
            return None, 0
        lock.mark_login()
    try:
        mailbox = await app.store.get_mailbox(account.id, "INBOX")
        if mailbox is None:
            raise NotFoundError(f"{account.address} has no INBOX")
        cache = _cache(app)
        drop = cache.get(mailbox.id, mailbox.uidvalidity, mailbox.highestmodseq)
        if drop is None:
            metas = await app.store.messages(mailbox.id)
            drop = Maildrop(tuple(MaildropEntry(m.uid, m.blob_id, m.size) for m in metas), mailbox.uidvalidity)
            cache.put(mailbox.id, mailbox.uidvalidity, mailbox.highestmodseq, drop)
    except StoreError:
        lock.release()
        clog.exception("%s: loading the maildrop failed", account.address)
        session.login_unavailable()
        return None, 0
    except BaseException:
        lock.release()
        raise
    clog.info("%s logged in (%s), %d messages", account.address, event.mechanism, len(drop))
    session.login_ok(account.address, drop)
    return lock, mailbox.id
