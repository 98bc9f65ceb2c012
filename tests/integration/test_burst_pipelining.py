"""The burst sender against a PIPELINING server on 127.0.0.1:0 (aiosmtpd offers no PIPELINING).

What the pipelined path must keep: every message exactly once, the next message's commands riding with
the previous message without mixing transactions up, a 4xx to the final dot retried (the connection
carrying the next message's commands is dropped and that message starts over), all-or-nothing for a
message with several recipients, and no octet of a message on the wire before its mark.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from postroom.burst.express import Express
from postroom.burst.transport import Envelope, Outcome, Sender, Work, parse_transport
from postroom.delivery.client import SmtpClient, TransactionResult
from postroom.delivery.wire import data_payload


@dataclass
class PipeliningMX:
    """Reads commands as they come (so pipelined groups work) and records what it accepted."""

    rcpt_reply: Callable[[str], bytes] = lambda _a: b"250 2.1.5 ok"
    final_reply: Callable[[bytes], bytes] = lambda _m: b"250 2.0.0 queued"
    drop_when: Callable[[bytes], bool] = lambda _m: False  # close without a reply after this message's data
    received: list[tuple[tuple[str, ...], bytes]] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 mx.test ESMTP\r\n")
        rcpts: list[str] = []
        ok = False
        try:
            while line := await reader.readline():
                self.lines.append(line)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    rcpts, ok = [], True
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == b"RCPT":
                    addr = line.decode().split("<", 1)[1].split(">", 1)[0]
                    reply = self.rcpt_reply(addr)
                    if reply.startswith(b"2"):
                        rcpts.append(addr)
                    writer.write(reply + b"\r\n")
                elif verb == b"DATA":
                    if not ok or not rcpts:
                        writer.write(b"554 5.5.1 no valid recipients\r\n")
                        continue
                    writer.write(b"354 go ahead\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    if self.drop_when(data):
                        writer.transport.abort()
                        return
                    reply = self.final_reply(data)
                    if reply.startswith(b"2"):
                        self.received.append((tuple(rcpts), data))
                    writer.write(reply + b"\r\n")
                    ok = False
                    if reply.startswith(b"421"):
                        await writer.drain()
                        return
                elif verb == b"RSET":
                    rcpts, ok = [], False
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    return
                else:
                    writer.write(b"502 5.5.2 unknown\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


@pytest.fixture
async def mx() -> AsyncIterator[tuple[PipeliningMX, int]]:
    server_mx = PipeliningMX()
    server = await asyncio.start_server(server_mx.serve, "127.0.0.1", 0)
    yield server_mx, int(server.sockets[0].getsockname()[1])
    server.close()


def message(n: int) -> bytes:
    return f"Subject: m{n}\r\nMessage-ID: <m{n}@x>\r\n\r\nbody {n}\r\n.starts with a dot\r\n".encode()


async def send_all(mx: PipeliningMX, port: int, envelopes: list[Envelope], concurrency: int = 2) -> dict[int, Outcome]:
    """Run :meth:`Sender.run` over ``envelopes``; each mark checks that nothing of its message arrived."""
    snd = Sender(parse_transport(f"smtp://127.0.0.1:{port}?concurrency={concurrency}"), None, backoff_base=0.01)
    outcomes: dict[int, Outcome] = {}
    queue: list[Work] = []
    for n, env in enumerate(envelopes):

        async def mark(env: Envelope = env) -> None:
            await asyncio.sleep(0)  # a mark takes its time; DATA must wait for it
            assert all(data != env.data for _, data in mx.received), "message data before its mark"

        def done(outcome: Outcome, n: int = n) -> None:
            assert n not in outcomes, f"message {n} finished twice"
            outcomes[n] = outcome

        queue.append(Work(env, mark, done))
    await run_works(snd, queue)
    return outcomes


async def run_works(snd: Sender, works: list[Work]) -> None:
    """Run :meth:`Sender.run` over ``works`` in order, then close the sender."""
    queue = works[::-1]

    async def take() -> Work | None:
        await asyncio.sleep(0)
        return queue.pop() if queue else None

    await snd.run(take, lambda: queue.pop() if queue else None)
    await snd.close()


@pytest.mark.parametrize("lane", ["coroutine", "express"])
@pytest.mark.parametrize("premade", [False, True], ids=["stuffed-by-client", "payload-made-ahead"])
async def test_every_message_once_with_the_next_one_pipelined(
    mx: tuple[PipeliningMX, int], monkeypatch: pytest.MonkeyPatch, premade: bool, lane: str
) -> None:
    server, port = mx
    riding: list[bool] = []
    original = SmtpClient.transaction
    original_head = Express._send_head

    async def counting(self: SmtpClient, *args: Any, **kwargs: Any) -> TransactionResult:
        riding.append(kwargs.get("sent_head") is not None)
        return await original(self, *args, **kwargs)

    def counting_head(self: Express, work: Work, before: bytes) -> bool:
        riding.append(bool(before))  # a command group behind the previous message's data
        return original_head(self, work, before)

    monkeypatch.setattr(SmtpClient, "transaction", counting)
    monkeypatch.setattr(Express, "_send_head", counting_head)
    if lane == "coroutine":
        monkeypatch.setattr(Sender, "_express_ok", lambda *_: False)
    envs = [
        Envelope("billing@x.test", (f"c{n}@x.test",), message(n), payload=data_payload(message(n)) if premade else None)
        for n in range(40)
    ]
    outcomes = await send_all(server, port, envs)
    assert sum(riding) >= 30  # most messages' commands went out with the message before
    assert {o.status for o in outcomes.values()} == {"sent"} and len(outcomes) == 40
    got = Counter(rcpts[0] for rcpts, _ in server.received)
    assert got == Counter(f"c{n}@x.test" for n in range(40))
    for rcpts, data in server.received:  # each message went to its own recipient, dot-stuffed
        n = int(rcpts[0][1:].split("@")[0])
        assert f"body {n}\r\n..starts with a dot".encode() in data
    assert server.connections == 2  # reused, never one per message


async def test_4xx_to_the_final_dot_is_retried_and_the_next_message_starts_over(
    mx: tuple[PipeliningMX, int],
) -> None:
    server, port = mx
    refused: Counter[bytes] = Counter()

    def final(data: bytes) -> bytes:
        if b"body 3\r\n" in data and refused[b"3"] < 2:
            refused[b"3"] += 1
            return b"451 4.3.0 try again"
        if b"body 7\r\n" in data:
            return b"554 5.7.1 rejected"
        return b"250 2.0.0 queued"

    server.final_reply = final
    envs = [Envelope("billing@x.test", (f"c{n}@x.test",), message(n)) for n in range(12)]
    outcomes = await send_all(server, port, envs, concurrency=1)
    assert outcomes[3].status == "sent" and refused[b"3"] == 2
    assert outcomes[7].status == "failed" and outcomes[7].reply.startswith("554")
    assert all(outcomes[n].status == "sent" for n in range(12) if n != 7)
    got = Counter(rcpts[0] for rcpts, _ in server.received)
    assert all(v == 1 for v in got.values()) and len(got) == 11


async def test_several_recipients_are_all_or_nothing(mx: tuple[PipeliningMX, int]) -> None:
    server, port = mx
    server.rcpt_reply = lambda a: b"550 5.1.1 no such user" if a == "gone@x.test" else b"250 2.1.5 ok"
    envs = [
        Envelope("billing@x.test", ("a@x.test", "gone@x.test", "b@x.test"), message(1)),
        Envelope("billing@x.test", ("a@x.test", "b@x.test"), message(2)),
    ]
    outcomes = await send_all(server, port, envs, concurrency=1)
    assert outcomes[0].status == "failed" and outcomes[0].reply.startswith("550 5.1.1")
    assert outcomes[1].status == "sent"
    assert server.received == [(("a@x.test", "b@x.test"), server.received[0][1])]
    assert b"body 2\r\n" in server.received[0][1]
    # DATA was never sent for the refused message: RSET instead, then the next transaction
    verbs = [line[:4] for line in server.lines]
    assert verbs.count(b"DATA") == 1 and b"RSET" in verbs


async def test_a_failing_mark_stops_every_connection_and_sends_nothing_of_that_message(
    mx: tuple[PipeliningMX, int],
) -> None:
    server, port = mx
    snd = Sender(parse_transport(f"smtp://127.0.0.1:{port}?concurrency=3"), None)
    envs = [Envelope("billing@x.test", (f"c{n}@x.test",), message(n)) for n in range(30)]
    queue = [Work(env, _mark(n), lambda _o: None) for n, env in enumerate(envs)][::-1]

    async def take() -> Work | None:
        await asyncio.sleep(0)
        return queue.pop() if queue else None

    with pytest.raises(OSError, match="ledger disk full"):
        await snd.run(take, lambda: queue.pop() if queue else None)
    await snd.close()
    await asyncio.sleep(0.05)  # let the server see the connections end
    assert not any(b"body 5\r\n" in data for _, data in server.received)
    assert not any(b"QUIT" in data for _, data in server.received)  # no command went into a message


def _mark(n: int) -> Callable[[], Awaitable[None]]:
    async def mark() -> None:
        await asyncio.sleep(0)
        if n == 5:
            raise OSError("ledger disk full")

    return mark


# -- the express lane (burst/express.py): what it must hand over, and how ---------------------------------
def sent_once(server: PipeliningMX, expected: set[int]) -> None:
    got = Counter(int(rcpts[0][1:].split("@")[0]) for rcpts, _ in server.received)
    assert set(got) == expected and all(v == 1 for v in got.values()), got


async def test_express_connection_lost_during_data_is_unknown_and_the_next_starts_over(
    mx: tuple[PipeliningMX, int],
) -> None:
    server, port = mx
    dropped: list[int] = []

    def drop(data: bytes) -> bool:
        if b"body 6\r\n" in data and not dropped:
            dropped.append(6)
            return True
        return False

    server.drop_when = drop
    envs = [Envelope("billing@x.test", (f"c{n}@x.test",), message(n)) for n in range(14)]
    outcomes = await send_all(server, port, envs, concurrency=1)
    assert outcomes[6].status == "unknown" and "during DATA" in outcomes[6].reply
    assert all(outcomes[n].status == "sent" for n in range(14) if n != 6)
    sent_once(server, set(range(14)) - {6})  # 7's group was on the wire: it started over, once
    assert server.connections == 2


async def test_express_hands_a_refused_recipient_to_the_coroutine_path(mx: tuple[PipeliningMX, int]) -> None:
    server, port = mx
    server.rcpt_reply = lambda a: b"550 5.1.1 no such user" if a == "c5@x.test" else b"250 2.1.5 ok"
    envs = [Envelope("billing@x.test", (f"c{n}@x.test",), message(n)) for n in range(12)]
    outcomes = await send_all(server, port, envs, concurrency=1)
    assert outcomes[5].status == "failed" and outcomes[5].reply.startswith("550 5.1.1")
    assert all(outcomes[n].status == "sent" for n in range(12) if n != 5)
    sent_once(server, set(range(12)) - {5})
    assert server.connections == 1  # a refusal is no reason to reconnect


async def test_express_421_to_the_final_dot_reconnects_and_retries(mx: tuple[PipeliningMX, int]) -> None:
    server, port = mx
    closed: list[int] = []

    def final(data: bytes) -> bytes:
        if b"body 4\r\n" in data and not closed:
            closed.append(4)
            return b"421 4.3.2 closing"
        return b"250 2.0.0 queued"

    server.final_reply = final
    envs = [Envelope("billing@x.test", (f"c{n}@x.test",), message(n)) for n in range(10)]
    outcomes = await send_all(server, port, envs, concurrency=1)
    assert {o.status for o in outcomes.values()} == {"sent"} and len(outcomes) == 10
    sent_once(server, set(range(10)))
    assert server.connections == 2


async def test_express_ends_connections_after_messages_per_connection(
    mx: tuple[PipeliningMX, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from postroom.burst import transport

    monkeypatch.setattr(transport, "MESSAGES_PER_CONNECTION", 4)
    server, port = mx
    envs = [Envelope("billing@x.test", (f"c{n}@x.test",), message(n)) for n in range(20)]
    outcomes = await send_all(server, port, envs, concurrency=1)
    assert {o.status for o in outcomes.values()} == {"sent"} and len(outcomes) == 20
    sent_once(server, set(range(20)))
    assert server.connections == 5
    assert [line[:4] for line in server.lines].count(b"QUIT") >= 4  # ended politely, not dropped


async def test_express_writes_data_only_after_a_ready_mark(mx: tuple[PipeliningMX, int]) -> None:
    """``mark_now``: a mark already durable lets the data go at once; one not yet durable is awaited."""
    server, port = mx
    snd = Sender(parse_transport(f"smtp://127.0.0.1:{port}?concurrency=1"), None)
    envs = [Envelope("billing@x.test", (f"c{n}@x.test",), message(n)) for n in range(16)]
    calls: Counter[str] = Counter()
    queue: list[Work] = []
    for n, env in enumerate(envs):

        def before(env: Envelope = env) -> None:
            assert all(data != env.data for _, data in server.received), "message data before its mark"

        async def slow(env: Envelope = env) -> None:
            await asyncio.sleep(0.001)
            before(env)
            calls["awaited"] += 1

        def now(env: Envelope = env, n: int = n) -> bool:
            before(env)
            if n % 3 == 0:
                return False  # not durable yet: on_sending is awaited
            calls["now"] += 1
            return True

        queue.append(Work(env, slow, lambda _o: None, now))
    await run_works(snd, queue)
    sent_once(server, set(range(16)))
    assert calls["now"] >= 8 and calls["awaited"] >= 4
