"""The IMAP state machine's transition table: which command runs in which state, and the one place where
errors become tagged responses.

Invariants:
- ``TABLES[state]`` is the complete set of commands accepted in ``state`` (RFC 9051 §6); anything else is
  ``BAD`` without running any code of the command family. There is no reflection-based dispatch.
- Exactly here, :class:`~postroom.imap.core.No` becomes ``NO``, a grammar error becomes ``BAD`` and an
  unexpected exception becomes ``NO [SERVERBUG]`` (logged with its traceback). ``CancelledError`` and other
  ``BaseException``\\ s pass through.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from postroom.errors import RemoteProtocolError
from postroom.imap import cmd_auth, cmd_fetch, cmd_mailbox, cmd_search, cmd_store
from postroom.imap.core import No, Outcome, Session, State
from postroom.imap.limits import MAX_DEPTH
from postroom.imap.reader import Command
from postroom.imap.tokens import ParseError, Token, tokenize

log = logging.getLogger(__name__)

Handler = Callable[[Session, str, list[Token], bool], Awaitable[Outcome | None]]

ANY: dict[str, Handler] = {
    "CAPABILITY": cmd_auth.capability,
    "NOOP": cmd_auth.noop,
    "LOGOUT": cmd_auth.logout,
    "ID": cmd_auth.ident,
}
NOT_AUTH: dict[str, Handler] = {
    **ANY,
    "STARTTLS": cmd_auth.starttls,
    "LOGIN": cmd_auth.login,
    "AUTHENTICATE": cmd_auth.authenticate,
}
AUTH: dict[str, Handler] = {
    **ANY,
    "ENABLE": cmd_auth.enable,
    "NAMESPACE": cmd_auth.namespace,
    "SELECT": cmd_mailbox.select,
    "EXAMINE": cmd_mailbox.examine,
    "CREATE": cmd_mailbox.create,
    "DELETE": cmd_mailbox.delete,
    "RENAME": cmd_mailbox.rename,
    "SUBSCRIBE": cmd_mailbox.subscribe,
    "UNSUBSCRIBE": cmd_mailbox.unsubscribe,
    "LIST": cmd_mailbox.list_,
    "LSUB": cmd_mailbox.lsub,
    "STATUS": cmd_mailbox.status,
    "APPEND": cmd_mailbox.append,
    "IDLE": cmd_mailbox.idle,
}
SELECTED: dict[str, Handler] = {
    **AUTH,
    "CHECK": cmd_mailbox.check,
    "CLOSE": cmd_mailbox.close,
    "UNSELECT": cmd_mailbox.unselect,
    "FETCH": cmd_fetch.fetch,
    "STORE": cmd_store.store,
    "COPY": cmd_store.copy,
    "MOVE": cmd_store.move,
    "EXPUNGE": cmd_store.expunge,
    "SEARCH": cmd_search.search,
}
#: ``UID <verb>`` commands (selected state only).
UID: dict[str, Handler] = {
    "FETCH": cmd_fetch.fetch,
    "STORE": cmd_store.store,
    "COPY": cmd_store.copy,
    "MOVE": cmd_store.move,
    "EXPUNGE": cmd_store.expunge,
    "SEARCH": cmd_search.search,
}
#: Commands during which EXPUNGE must not be sent (RFC 9051 §7.5.1); their UID forms may send it.
NO_EXPUNGE = frozenset({"FETCH", "STORE", "SEARCH"})
TABLES: dict[State, dict[str, Handler]] = {
    State.NOT_AUTH: NOT_AUTH,
    State.AUTH: AUTH,
    State.SELECTED: SELECTED,
    State.LOGOUT: {},
}


async def execute(s: Session, cmd: Command) -> Outcome:
    """Run one framed command; the responses are left in the session's output buffer."""
    tag = "*"
    try:
        tag, name, args = tokenize(cmd, s.config.max_depth if s.config.max_depth else MAX_DEPTH)
        uid = False
        table = TABLES[s.state]
        if name == "UID" and s.state is State.SELECTED:
            if not args or not isinstance(args[0], str):
                raise ParseError(tag, "UID needs a command")
            name = args[0].upper()
            args = args[1:]
            handler = UID.get(name)
            uid = True
        else:
            handler = table.get(name)
        if handler is None:
            known = any(name in t for t in TABLES.values()) or name == "UID"
            reason = f"{name[:20]} not allowed in the {s.state.value} state" if known else "Unknown command"
            s.tagged(tag, "BAD", reason)
            return Outcome.NONE
        if s.view is not None and s.view.gone and (uid or name not in NO_EXPUNGE):
            s.announce_expunges()  # deferred expunges go out before this command's own responses
        outcome = await handler(s, tag, args, uid)
        return outcome or Outcome.NONE
    except No as exc:
        s.tagged(tag, "NO", exc.text, exc.code)
    except ParseError as exc:
        s.tagged(exc.tag, "BAD", str(exc))
    except RemoteProtocolError as exc:
        s.tagged(tag, "BAD", str(exc))
    except Exception:
        log.exception("IMAP command failed")
        s.tagged(tag, "NO", "Internal error", "SERVERBUG")
    return Outcome.NONE


async def idle_done(s: Session, tag: str) -> None:
    """The client ended IDLE with DONE."""
    await s.poll(allow_expunge=True)
    s.tagged(tag, "OK", "IDLE terminated")
