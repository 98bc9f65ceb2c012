"""The IMAP session core: state, response helpers and change synchronisation. No I/O of its own.

States (RFC 9051 §3): not authenticated → authenticated → selected → logout. Which commands each state
accepts is the explicit table in :mod:`postroom.imap.dispatch`; the command families in ``cmd_*.py``
change ``state``, ``account`` and ``view``.

Invariants:
- Output is buffered in ``_out`` and handed to ``io.write`` by :meth:`flush`; long responses (FETCH)
  call :meth:`flush_drain` between messages so memory stays bounded by the transport's high-water mark.
- Changes made by others reach this session only through :meth:`sync`, which announces them
  (FETCH/EXISTS/EXPUNGE or VANISHED) and applies them to ``view`` in the same step, so the MSN mapping the
  client holds is always the one ``view`` holds. ``allow_expunge=False`` during FETCH, STORE and SEARCH
  (RFC 9051 §7.5.1): expunges are then deferred, never dropped.
- Passwords and message bodies are never logged.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from postroom.imap import encode
from postroom.imap.blobcache import BlobCache
from postroom.imap.limits import ImapConfig
from postroom.imap.ports import AccountLike, AppendFn, AuthFn, ChangesSource, Io, MailPort, WatchLike
from postroom.imap.snapshots import Snapshots
from postroom.imap.view import View

log = logging.getLogger(__name__)

FLUSH_JOIN_MAX = 256 * 1024  # octets of buffered responses joined into one write; larger ones go piecewise


class State(enum.Enum):
    NOT_AUTH = "not authenticated"
    AUTH = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


class Outcome(enum.Enum):
    """What the adapter must do after a command."""

    NONE = 0
    STARTTLS = 1  # upgrade now; drop everything buffered
    IDLE = 2  # wait for changes or DONE
    LOGOUT = 3  # close the connection


class No(Exception):
    """Answer the command with tagged NO (``code`` is a response code such as ``TRYCREATE``)."""

    def __init__(self, text: str, code: str = "") -> None:
        super().__init__(text)
        self.text = text
        self.code = code


class Session:
    """One client's IMAP session. Driven by :func:`postroom.imap.dispatch.execute`."""

    def __init__(
        self,
        *,
        store: MailPort,
        append: AppendFn,
        authenticate: AuthFn,
        io: Io,
        config: ImapConfig,
        peer_ip: str,
        tls: bool,
        starttls: bool,
        plaintext_ok: bool,
        hostname: str = "postroom",
        snapshots: Snapshots | None = None,
        changes_source: ChangesSource | None = None,
        blob_cache: BlobCache | None = None,
    ) -> None:
        self.store = store
        self.append_fn = append
        self.authenticate = authenticate
        self.io = io
        self.config = config
        self.peer_ip = peer_ip
        self.tls = tls
        self.starttls_available = starttls and not tls
        self.plaintext_ok = plaintext_ok
        self.hostname = hostname
        self.snapshots = snapshots
        self.changes_source = changes_source
        self.blob_cache = blob_cache
        self.state = State.NOT_AUTH
        self.account: AccountLike | None = None
        self.view: View | None = None
        self.watch: WatchLike | None = None
        self.enabled: set[str] = set()
        self.condstore = False  # CONDSTORE on for this session (enabled or implied, RFC 7162 §3.1)
        self.saved: list[int] = []  # SEARCHRES "$" (UIDs)
        self.client_id: dict[str, str] = {}
        self.bye = ""  # set by sync when the selected mailbox vanished: the adapter says BYE and closes
        self._out: list[bytes] = []
        #: (address, ip) -> may this login proceed? The adapter plugs in the per-user-per-IP counter.
        self.admit: Callable[[str, str], bool] = lambda address, ip: True

    # -- capabilities -----------------------------------------------------------------------------
    @property
    def login_allowed(self) -> bool:
        return self.tls or self.plaintext_ok

    @property
    def rev2(self) -> bool:
        return "IMAP4REV2" in self.enabled

    @property
    def qresync(self) -> bool:
        return "QRESYNC" in self.enabled

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "IMAP4rev2", "LITERAL+", "SASL-IR", "ID", "ENABLE"]
        if self.state is State.NOT_AUTH:
            if self.starttls_available:
                caps.append("STARTTLS")
            if self.login_allowed:
                caps += ["AUTH=PLAIN", "AUTH=LOGIN"]
            else:
                caps.append("LOGINDISABLED")
            return " ".join(caps)
        caps += [
            "IDLE",
            "UIDPLUS",
            "MOVE",
            "UNSELECT",
            "NAMESPACE",
            "CHILDREN",
            "SPECIAL-USE",
            "CREATE-SPECIAL-USE",
            "LIST-EXTENDED",
            "LIST-STATUS",
            "STATUS=SIZE",
            "ESEARCH",
            "SEARCHRES",
            "CONDSTORE",
            "QRESYNC",
            "BINARY",
            f"APPENDLIMIT={self.config.append_limit}",
        ]
        return " ".join(caps)

    # -- output -----------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self._out.append(data)

    def untagged(self, text: str) -> None:
        self._out.append(b"* " + text.encode("utf-8") + b"\r\n")

    def tagged(self, tag: str, status: str, text: str, code: str = "") -> None:
        code_part = f"[{code}] " if code else ""
        self._out.append(f"{tag} {status} {code_part}{text}\r\n".encode())

    def flush(self) -> None:
        out = self._out
        if not out:
            return
        if len(out) == 1:
            self.io.write(out[0])
        elif sum(len(x) for x in out) <= FLUSH_JOIN_MAX:
            self.io.write(b"".join(out))  # one write (one send) for a command's responses
        else:
            for piece in out:  # large bodies: no extra copy of the whole response
                self.io.write(piece)
        out.clear()

    async def flush_drain(self) -> None:
        self.flush()
        await self.io.drain()

    # -- selection --------------------------------------------------------------------------------
    def deselect(self) -> None:
        if self.watch is not None:
            self.watch.close()
        self.watch = None
        self.view = None
        self.saved = []
        if self.state is State.SELECTED:
            self.state = State.AUTH

    def applied_own_change(self, modseq_before: int, modseq_after: int) -> None:
        """After this session's own flag change, applied to ``view`` from the store's answer: when the view
        was current just before the change (same transaction), it is current just after it, so the change
        is not read back (the next sync asks only for what came after)."""
        view = self.view
        if view is not None and modseq_before >= 0 and modseq_before == view.modseq < modseq_after:
            view.modseq = modseq_after

    def fetch_line(self, msn: int, items: list[bytes]) -> bytes:
        return b"* %d FETCH (" % msn + b" ".join(items) + b")\r\n"

    async def poll(self, allow_expunge: bool, force: bool = False) -> None:
        """Sync if a change was announced (or always with ``force``, as NOOP does)."""
        if self.watch is None or self.view is None:
            return
        if force or self.watch.pending:
            self.watch.clear()
            await self.sync(allow_expunge, shared=True, fresh=force)
        elif allow_expunge and self.view.gone:
            self.announce_expunges()

    async def sync(self, allow_expunge: bool, shared: bool = False, fresh: bool = False) -> None:
        """Announce and apply what changed since ``view.modseq`` (``shared``: the query may be shared with
        other sessions woken by the same commit; ``fresh``: but it must be asked now, as NOOP asks)."""
        view = self.view
        if view is None:
            return
        if self.changes_source is not None and shared:
            changes = await self.changes_source.get(view.mailbox_id, view.modseq, fresh)
        else:
            changes = await self.store.changes_since(view.mailbox_id, view.modseq)
        if not changes.exists:
            self.bye = "selected mailbox was deleted or renamed"
            return
        expunged = set(changes.expunged)
        for uid in expunged:
            if view.index_of_uid(uid) is not None:
                view.gone.add(uid)
        if allow_expunge and view.gone:
            self.announce_expunges()
        last = view.uids[-1] if view.uids else 0
        new = []
        for meta in changes.changed:
            if meta.uid in expunged:
                continue
            i = view.index_of_uid(meta.uid)
            if i is None:
                if meta.uid > last:
                    new.append(meta)
                continue
            old = view.metas[i]
            if old.flags != meta.flags or (self.condstore and old.modseq < meta.modseq):
                view.metas[i] = meta
                items = [b"UID %d" % meta.uid, b"FLAGS " + encode.flag_list(meta.flags)]
                if self.condstore:
                    items.append(b"MODSEQ (%d)" % meta.modseq)
                self.send(self.fetch_line(i + 1, items))
            else:
                view.metas[i] = meta
        if new:
            for meta in new:
                view.append(meta)
            self.untagged(f"{len(view)} EXISTS")
        view.modseq = max(view.modseq, changes.highestmodseq)
        view.uidnext = max(view.uidnext, changes.uidnext)

    def announce_expunges(self) -> None:
        view = self.view
        if view is None or not view.gone:
            return
        gone = set(view.gone)
        if self.qresync:
            msns = view.remove_uids(gone)
            if msns:
                self.untagged("VANISHED " + encode.seq_text(sorted(gone)))
        else:
            for msn in view.remove_uids(gone):
                self.send(b"* %d EXPUNGE\r\n" % msn)
