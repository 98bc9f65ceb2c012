"""The sender's express lane: the steady state of a pipelined connection, driven by callbacks.

Once a connection is open and the transport is unpaced, most messages go the same way: the previous
message's data and this one's MAIL/RCPT/DATA group leave in one write, then come the previous message's
final reply and this one's three replies. :class:`Express` runs exactly that from the connection's data
callback, with no coroutine, future or timer per message (against smtp-sink a prototype of this loop alone
used ~35 µs of CPU per message on this machine, the coroutine path ~90). Anything else it hands back to
:class:`~postroom.burst.transport.Sender`'s coroutine path in a state that path continues from.

Invariants (the same as the coroutine path's, see :mod:`postroom.burst.transport`):
- A message's first octet is written only after its durable mark (``Work.mark_now`` True, or
  ``Work.on_sending`` awaited); a failing mark closes the connection without the final dot and is raised.
- A reply the lane does not expect is never consumed behind the coroutine path's back: MAIL/RCPT/DATA
  replies that are not 250/250/354 are given back (``SmtpClient.unread``) and the message is handed over
  with its command group on the wire (``_Line.carried``), so the coroutine path answers it (RSET, the
  lone dot, the outcome) exactly as it would have.
- The final reply of a message whose data went out decides it here: 2xx sent; otherwise the outcome goes
  back to the sender's retry loop, and the connection is closed on 421 or on a 4xx with the next group on
  the wire (that message starts over), as the coroutine path does.
- A connection lost (or a reply timeout) with data out and no final reply makes that message ``unknown``;
  a message with only its command group out starts over (``deferred`` when it is the only one in flight).
- Only single-recipient messages ride the lane (several recipients wait for every RCPT before DATA);
  a message that cannot (or a connection at ``MESSAGES_PER_CONNECTION``) ends the run after the current one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from postroom.delivery import wire
from postroom.delivery.client import DATA_END_TIMEOUT, DATA_INIT_TIMEOUT, Head, SmtpClient
from postroom.delivery.wire import Reply, data_payload
from postroom.errors import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from postroom.burst.transport import Outcome, Work, _Line


class Express:
    """One run of the lane on one connection; :meth:`run` returns when it hands back."""

    def __init__(
        self,
        line: _Line,
        client: SmtpClient,
        poll: Callable[[], Work | None],
        eligible: Callable[[Work], bool],
        outcome: Callable[..., Outcome],
    ) -> None:
        self.line = line
        self.client = client
        self.poll = poll
        self.eligible = eligible  # may this message ride the lane on this connection now?
        self.outcome = outcome  # Outcome(status, reply, retry_now=False)
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[tuple[Work, Outcome] | None] = self.loop.create_future()
        self.cur: Work | None = None  # its data is out: waiting for its final reply
        self.nxt: tuple[Work, bytes] | None = None  # its command group is out: waiting for 3 replies
        self.got: list[Reply] = []  # replies to nxt's group so far
        self.after: Work | None = None  # polled but not for the lane: the coroutine path takes it next
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.marking: asyncio.Future[None] | None = None

    async def run(self, first: Work) -> tuple[Work, Outcome] | None:
        """Send ``first`` and whatever :attr:`poll` gives while the lane holds. Returns None when every
        message it took is settled, or one message and the outcome of its attempt, for the sender's retry
        loop (see the module invariants)."""
        self.client.listen(self._on_data)
        try:
            try:
                if not self._send_head(first, b""):
                    self._finish(None)
            except (OSError, RemoteProtocolError) as exc:
                self._lost(exc)
            return await self.done
        except BaseException:
            self._drop()
            raise
        finally:
            self.client.listen(None)
            if self.timer is not None:
                self.timer.cancel()
            if self.marking is not None and not self.marking.done():
                self.marking.cancel()
            if self.after is not None and self.line.carried is None:
                self.line.carried = (self.after, None)

    # -- writing --------------------------------------------------------------------------------
    def _head(self, work: Work) -> bytes | None:
        """``work``'s MAIL, RCPT and DATA in one group (what ``SmtpClient.head`` writes, without its objects;
        :attr:`eligible` ensured one recipient and PIPELINING). None: an address that cannot go on the wire
        (it fails on its own turn, on the coroutine path, with the reason)."""
        env = work.env
        try:
            return wire.command_group(
                env.sender,
                env.recipients,
                self.client.ext,
                size=len(env.data),
                eight_bit=not env.data.isascii(),
                smtputf8=env.smtputf8,
            )
        except LocalProtocolError:
            return None

    def _send_head(self, work: Work, before: bytes) -> bool:
        """Write ``before`` (a message's data) and ``work``'s command group; False when ``work`` cannot
        ride the lane (then only ``before`` is written, and ``work`` goes to the coroutine path)."""
        head = self._head(work) if self.eligible(work) else None
        if head is None:
            self.after = work
            if before:
                self._write(before, DATA_END_TIMEOUT)
            return False
        self.nxt = (work, head)
        self.client.transactions += 1
        self._write(before + head if before else head, DATA_END_TIMEOUT if before else DATA_INIT_TIMEOUT)
        return True

    def _write(self, data: bytes, timeout: float) -> None:
        self.client.send(data, shown=f"[{len(data)} octets, express]")
        self.deadline = self.loop.time() + timeout
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.done.done():
            return
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        self._lost(TimeoutError("no reply in time"))

    # -- reading --------------------------------------------------------------------------------
    def _on_data(self) -> None:
        if self.done.done():
            return
        while True:
            try:
                reply = self.client.reply_nowait()
            except (OSError, RemoteProtocolError) as exc:
                self._lost(exc)
                return
            if reply is None:
                return
            if self.cur is not None:
                self._final(reply)
            elif self.nxt is not None:
                self.got.append(reply)
                if len(self.got) == 3:
                    self._group_answered()
            if self.done.done():
                return

    def _final(self, reply: Reply) -> None:
        work, self.cur = self.cur, None
        assert work is not None
        if reply.positive:
            self.line.used += 1
            work.done(self.outcome("sent", str(reply)))
            if self.nxt is None:
                self._finish(None)
            return
        if reply.code == 421 or (reply.transient and self.nxt is not None):
            self._drop()  # the next group cannot be taken back: that message starts over
            if self.nxt is not None:
                self.line.carried, self.nxt = (self.nxt[0], None), None
        elif self.nxt is not None:
            self.line.carried = (self.nxt[0], Head(self.nxt[1], 1))  # its replies are to come: the coroutine
            self.nxt = None  # path reads them
        self._finish((work, self.outcome("failed" if reply.permanent else "deferred", str(reply))))

    def _group_answered(self) -> None:
        mail, rcpt, data = self.got
        self.got = []
        assert self.nxt is not None
        if not (mail.positive and rcpt.positive and data.code == 354):
            self.client.unread([mail, rcpt, data])  # the coroutine path answers them as it would have
            self.line.carried, self.nxt = (self.nxt[0], Head(self.nxt[1], 1)), None
            self._finish(None)
            return
        work = self.nxt[0]
        if work.mark_now is not None and work.mark_now():
            self._send_data(work)
            return
        self.marking = asyncio.ensure_future(work.on_sending())
        self.marking.add_done_callback(lambda task: self._marked(task, work))

    def _marked(self, task: asyncio.Future[None], work: Work) -> None:
        if self.done.done():
            return
        if task.cancelled():
            self._drop()
            self._finish(None)
            return
        exc = task.exception()
        if exc is not None:
            self._drop()  # no final dot: the server discards the transaction
            self.done.set_exception(exc)
            return
        self._send_data(work)

    def _send_data(self, work: Work) -> None:
        """``work``'s mark is on disk: write its data, and the next message's group when one may follow."""
        assert self.nxt is not None and self.nxt[0] is work
        self.nxt = None
        self.cur = work
        payload = work.env.payload if work.env.payload is not None else data_payload(work.env.data)
        following = self.poll()
        try:
            if following is None:
                self._write(payload, DATA_END_TIMEOUT)
            else:
                self._send_head(following, payload)
        except (OSError, RemoteProtocolError) as exc:
            self._lost(exc)

    # -- ending ---------------------------------------------------------------------------------
    def _lost(self, exc: BaseException) -> None:
        """The connection broke (or a reply did not come): settle what was in flight, see the invariants."""
        if self.done.done():
            return
        cur, nxt = self.cur, self.nxt
        self.cur = self.nxt = None
        self._drop()
        if nxt is not None:
            if cur is not None:
                self.line.carried = (nxt[0], None)  # starts over on a new connection
            else:  # the only one in flight: its attempt failed, at once again on a fresh connection
                self._finish((nxt[0], self.outcome("deferred", f"connection lost before DATA: {exc!r}", True)))
                return
        if cur is not None:
            reply = f"connection lost during DATA; the server may have accepted it ({exc!r})"
            self._finish((cur, self.outcome("unknown", reply)))
            return
        self._finish(None)

    def _drop(self) -> None:
        self.client.close()
        if self.line.client is self.client:
            self.line.client = None

    def _finish(self, result: tuple[Work, Outcome] | None) -> None:
        if not self.done.done():
            self.done.set_result(result)
