"""The mail store API: the one way every part of Postroom reads and changes mail.

SMTP delivery appends, IMAP and POP3 read and change, the queue claims and updates, the CLI manages
accounts. Backends (``sqlite``, later ``postgres``) implement :class:`Store`; the contract suite in
``tests/contract`` runs against each.

Invariants every backend keeps:
- **Durable on return.** When ``append``/``set_flags``/``expunge``/… return, the change is on stable storage
  (data, metadata and any new directory entry fsynced). Concurrent callers share one commit (group commit).
- **Immutable bytes.** A stored message's bytes never change; copies share them (``blob_id``).
- **UIDs** grow strictly within a mailbox and are never reused while ``uidvalidity`` stays the same, also
  across restarts. **MODSEQ** grows strictly per mailbox; every flag change, append and expunge gets a new
  one (RFC 7162), and expunges leave a tombstone so ``changes_since`` can report them (QRESYNC VANISHED).
- **Parse once.** Every message is analysed by :func:`postroom.mime.analyze` once, and its structure kept:
  by ``append``, or, for an ``append(..., analyze=False)`` (SMTP delivery), by the first ``structures`` call
  that asks for it. Readers get it with ``structures`` and never parse again.
- **Change feed.** After a commit, every :class:`Watch` on a changed mailbox or account is woken, in this
  process and in every other process that opened the same store. A woken watcher asks ``changes_since``.
- All methods are coroutines and never block the event loop.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

#: Mailboxes created for every new account, with their RFC 6154 special-use attribute.
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)

FlagOp = Literal["add", "remove", "replace"]


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    address: str  # lower-cased local@domain; the login name
    password_hash: str


@dataclass(frozen=True, slots=True)
class Mailbox:
    id: int
    account_id: int
    name: str  # hierarchy separator "/"; "INBOX" is always spelled so
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    special_use: str | None = None
    subscribed: bool = True


@dataclass(frozen=True, slots=True)
class MailboxStatus:
    """Counts for STATUS / SELECT / LIST-STATUS / POP3 STAT."""

    messages: int
    unseen: int
    deleted: int
    size: int
    uidnext: int
    uidvalidity: int
    highestmodseq: int


@dataclass(frozen=True, slots=True)
class MessageMeta:
    """One message in one mailbox, without its bytes."""

    uid: int
    blob_id: int  # the immutable stored bytes, shared by copies
    flags: frozenset[str]  # system flags ("\\Seen", …) and keywords, case as first stored
    modseq: int
    size: int  # octets of the stored message (CRLF line endings)
    internaldate: float  # seconds since the epoch, UTC


@dataclass(frozen=True, slots=True)
class AppendTarget:
    """Where one appended message goes. ``internaldate`` None means now."""

    mailbox_id: int
    flags: frozenset[str] = frozenset()
    internaldate: float | None = None


@dataclass(frozen=True, slots=True)
class Changes:
    """What happened in a mailbox after a given MODSEQ (for IDLE/NOOP, CONDSTORE and QRESYNC)."""

    changed: list[MessageMeta]  # new or with changed flags, ascending UID
    expunged: list[int]  # UIDs removed since then, ascending
    highestmodseq: int
    uidnext: int
    exists: bool = True  # False when the mailbox itself was deleted or renamed away


@dataclass(frozen=True, slots=True)
class FlagUpdate:
    """What :meth:`Store.update_flags` did, with the mailbox's HIGHESTMODSEQ around it."""

    changed: list[MessageMeta]  # messages whose flags changed, with their new MODSEQ
    failed: list[int]  # UIDs left alone because their MODSEQ exceeds UNCHANGEDSINCE
    modseq_before: int  # HIGHESTMODSEQ just before the change, in its transaction (-1: not known)
    modseq_after: int  # HIGHESTMODSEQ just after it (= modseq_before when nothing changed)


@dataclass(frozen=True, slots=True)
class OutboundRecipient:
    address: str
    notify: str = ""  # DSN NOTIFY (RFC 3461): "", "NEVER" or comma list of SUCCESS,FAILURE,DELAY
    orcpt: str = ""  # DSN ORCPT, as received


@dataclass(frozen=True, slots=True)
class OutboundEnvelope:
    """A message for remote recipients, queued in the same commit as its local copies."""

    sender: str  # "" for the null reverse-path (bounces)
    recipients: tuple[OutboundRecipient, ...]
    ret: str = ""  # DSN RET: FULL | HDRS | ""
    envid: str = ""  # DSN ENVID
    smtputf8: bool = False
    eight_bit: bool = False  # BODY=8BITMIME or 8-bit content seen


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One recipient of one queued message and its delivery state."""

    id: int
    message_id: int  # the queued message (its bytes: ``read_queued``)
    sender: str
    recipient: str
    domain: str
    status: Literal["pending", "deferred", "delivered", "failed"]
    attempts: int
    next_attempt: float
    last_reply: str
    created: float
    notify: str = ""
    orcpt: str = ""
    ret: str = ""
    envid: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Watch(abc.ABC):
    """A subscription to changes of one mailbox (or of an account's mailbox list).

    ``pending`` is cheap and synchronous: True once a change was committed since the last ``clear``.
    ``wait`` returns when ``pending`` becomes True (at once if it is).
    """

    @property
    @abc.abstractmethod
    def pending(self) -> bool: ...

    @abc.abstractmethod
    def clear(self) -> None: ...

    @abc.abstractmethod
    async def wait(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class Store(abc.ABC):
    """The mail store. See the module docstring for the invariants every backend keeps."""

    # -- lifecycle --------------------------------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- domains, accounts, aliases ---------------------------------------------------------------
    @abc.abstractmethod
    async def add_domain(self, name: str) -> None: ...

    @abc.abstractmethod
    async def list_domains(self) -> list[str]: ...

    @abc.abstractmethod
    async def create_account(self, address: str, password_hash: str) -> Account:
        """Create the account and its DEFAULT_MAILBOXES. Raises AlreadyExistsError."""

    @abc.abstractmethod
    async def delete_account(self, address: str) -> None:
        """Remove the account, its mailboxes and messages. Raises NotFoundError."""

    @abc.abstractmethod
    async def get_account(self, address: str) -> Account | None: ...

    @abc.abstractmethod
    async def list_accounts(self) -> list[Account]: ...

    @abc.abstractmethod
    async def set_password(self, address: str, password_hash: str) -> None: ...

    @abc.abstractmethod
    async def add_alias(self, alias: str, target: str) -> None: ...

    @abc.abstractmethod
    async def remove_alias(self, alias: str) -> None: ...

    @abc.abstractmethod
    async def list_aliases(self) -> list[tuple[str, str]]: ...

    @abc.abstractmethod
    async def resolve(self, address: str) -> Account | None:
        """The account mail to ``address`` lands in: the account itself or an alias's target."""

    # -- mailboxes --------------------------------------------------------------------------------
    @abc.abstractmethod
    async def list_mailboxes(self, account_id: int) -> list[Mailbox]: ...

    @abc.abstractmethod
    async def get_mailbox(self, account_id: int, name: str) -> Mailbox | None:
        """``INBOX`` matches case-insensitively (RFC 9051 §5.1); other names exactly."""

    @abc.abstractmethod
    async def create_mailbox(self, account_id: int, name: str, special_use: str | None = None) -> Mailbox: ...

    @abc.abstractmethod
    async def delete_mailbox(self, account_id: int, name: str) -> None: ...

    @abc.abstractmethod
    async def rename_mailbox(self, account_id: int, old: str, new: str) -> None:
        """Renaming INBOX moves its messages to ``new`` and leaves INBOX empty (RFC 9051 §6.3.6)."""

    @abc.abstractmethod
    async def set_subscribed(self, account_id: int, name: str, subscribed: bool) -> None: ...

    @abc.abstractmethod
    async def status(self, mailbox_id: int) -> MailboxStatus: ...

    # -- messages ---------------------------------------------------------------------------------
    @abc.abstractmethod
    async def append(
        self,
        raw: bytes,
        targets: Sequence[AppendTarget],
        outbound: OutboundEnvelope | None = None,
        analyze: bool = True,
    ) -> list[tuple[int, int]]:
        """Store ``raw`` once and add it to every target mailbox; queue it for ``outbound``.

        Returns ``(mailbox_id, uid)`` per target, in order. Durable on return; concurrent calls share one
        commit. Raises StoreFullError when the disk is full. With ``analyze=False`` the message's structure
        is computed at its first ``structures`` call instead of now: for callers that must answer fast, like
        SMTP's final dot (a message that is only relayed is then never analysed).
        """

    @abc.abstractmethod
    async def messages(self, mailbox_id: int) -> list[MessageMeta]:
        """Every message in the mailbox, ascending UID (a consistent snapshot)."""

    @abc.abstractmethod
    async def changes_since(self, mailbox_id: int, modseq: int) -> Changes: ...

    @abc.abstractmethod
    async def read(self, blob_id: int) -> bytes:
        """The whole stored message."""

    @abc.abstractmethod
    async def read_range(self, blob_id: int, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    async def structures(self, blob_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The parse-once structure of each message (see ``postroom.mime.analyze``)."""

    @abc.abstractmethod
    async def set_flags(
        self,
        mailbox_id: int,
        uids: Sequence[int],
        op: FlagOp,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> tuple[list[MessageMeta], list[int]]:
        """Change flags. Returns (messages whose flags changed, with their new MODSEQ; UIDs not changed
        because their MODSEQ exceeds ``unchanged_since`` (RFC 7162 §3.1.3)). Nonexistent UIDs are skipped."""

    async def update_flags(
        self,
        mailbox_id: int,
        uids: Sequence[int],
        op: FlagOp,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> FlagUpdate:
        """:meth:`set_flags`, also reporting the mailbox's HIGHESTMODSEQ before and after the change. A
        caller whose copy of the mailbox was current at ``modseq_before`` is current at ``modseq_after``
        once it applied ``changed``, without reading its own change back. This default does not know them."""
        changed, failed = await self.set_flags(mailbox_id, uids, op, flags, unchanged_since)
        return FlagUpdate(changed, failed, -1, -1)

    @abc.abstractmethod
    async def expunge(self, mailbox_id: int, uids: Sequence[int] | None = None) -> list[int]:
        """Remove messages flagged ``\\Deleted`` (only those in ``uids`` when given). Returns their UIDs."""

    @abc.abstractmethod
    async def delete_messages(self, mailbox_id: int, uids: Sequence[int]) -> list[int]:
        """Remove exactly these messages regardless of flags (POP3 QUIT). Returns the UIDs removed."""

    @abc.abstractmethod
    async def copy(self, src_mailbox_id: int, uids: Sequence[int], dst_mailbox_id: int) -> list[tuple[int, int]]:
        """Copy with flags; returns (source UID, new UID) pairs (RFC 4315 COPYUID)."""

    @abc.abstractmethod
    async def move(self, src_mailbox_id: int, uids: Sequence[int], dst_mailbox_id: int) -> list[tuple[int, int]]:
        """Copy then expunge from the source in one commit (RFC 6851)."""

    @abc.abstractmethod
    async def search_text(self, mailbox_id: int, terms: Sequence[str], body_only: bool = False) -> set[int]:
        """UIDs whose text (headers and body, or body only) contains every term (full-text index)."""

    # -- change feed ------------------------------------------------------------------------------
    @abc.abstractmethod
    def watch(self, mailbox_id: int) -> Watch:
        """Subscribe to changes of one mailbox."""

    @abc.abstractmethod
    def watch_account(self, account_id: int) -> Watch:
        """Subscribe to mailbox create/rename/delete of one account."""

    # -- outbound queue ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def queue_due(self, now: float, limit: int = 100) -> list[QueueEntry]:
        """Pending/deferred recipients whose next attempt is due, oldest first, claimed for this process."""

    @abc.abstractmethod
    async def queue_list(self) -> list[QueueEntry]: ...

    @abc.abstractmethod
    async def queue_update(
        self, entry_id: int, status: str, last_reply: str, next_attempt: float | None = None
    ) -> None:
        """Record an attempt's outcome (``attempts`` grows by one)."""

    @abc.abstractmethod
    async def queue_retry(self, entry_ids: Sequence[int] | None = None) -> int:
        """Make deferred entries due now (all when None). Returns how many."""

    @abc.abstractmethod
    async def queue_delete(self, entry_ids: Sequence[int]) -> int: ...

    @abc.abstractmethod
    async def read_queued(self, message_id: int) -> bytes: ...

    def queue_watch(self) -> Watch:
        """Woken when something is queued or made due (default: a mailbox-0 watch)."""
        return self.watch(0)
