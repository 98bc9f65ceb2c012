"""Transcripts of the sans-I/O IMAP core against the in-memory store: send this line, expect these
responses. No event loop: every coroutine is driven to completion by ``run``."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

from imap_fake_store import Account, FakeStore, run

from postroom.imap.core import Session
from postroom.imap.dispatch import execute
from postroom.imap.limits import ImapConfig
from postroom.imap.reader import Command, CommandReader, ContinueLiteral, LiteralRejected, Malformed
from postroom.imap.snapshots import Snapshots

PLAIN = b"From: Bob <bob@example.test>\r\nSubject: first\r\nDate: Mon, 7 Feb 1994 21:52:25 -0800\r\n\r\nhello world\r\n"
MULTI = (
    b'Subject: mixed\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n'
    b"--B\r\nContent-Type: text/plain\r\n\r\npart one\r\n"
    b"--B\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\naGk=\r\n"
    b"--B--\r\n"
)


class Client:
    """One session over the fake store; ``cmd`` returns the response lines of one command."""

    def __init__(
        self, store: FakeStore, tls: bool = True, login: bool = True, snapshots: Snapshots | None = None
    ) -> None:
        self.out = bytearray()
        self.lines_in: list[bytes] = []
        self.drains: list[int] = []  # output octets written when each drain happened
        self.reader = CommandReader(max_line=8192, max_literal=10_000)

        async def auth(user: str, password: str, ip: str) -> Account | None:
            return store.account if (user, password) == ("alice@example.test", "pw") else None

        self.session = Session(
            store=store,
            append=store.append_one,
            authenticate=auth,
            io=self,
            config=ImapConfig(max_line=8192, max_literal=10_000, append_limit=10_000),
            peer_ip="192.0.2.1",
            tls=tls,
            starttls=not tls,
            plaintext_ok=False,
            snapshots=snapshots,
        )
        if login:
            assert self.cmd('l LOGIN alice@example.test "pw"')[-1].startswith("l OK")

    def write(self, data: bytes) -> None:
        self.out += data

    async def drain(self) -> None:
        self.drains.append(len(self.out))
        return None

    async def read_line(self) -> bytes | None:
        return self.lines_in.pop(0) if self.lines_in else None

    def send(self, data: bytes) -> list[str]:
        self.reader.receive_data(data)
        while (ev := self.reader.next_event()) is not None:
            if isinstance(ev, Command):
                run(execute(self.session, ev))
                self.session.flush()
            elif isinstance(ev, ContinueLiteral):
                self.out += b"+ Ready\r\n"
            elif isinstance(ev, LiteralRejected):
                self.out += f"{ev.tag} NO [TOOBIG] too large\r\n".encode()
            elif isinstance(ev, Malformed):
                self.out += f"{ev.tag} BAD {ev.reason}\r\n".encode()
        text = bytes(self.out).decode("utf-8", "replace")
        self.out.clear()
        return text.split("\r\n")[:-1]

    def cmd(self, line: str) -> list[str]:
        return self.send(line.encode() + b"\r\n")


def test_capabilities_and_logindisabled_without_tls() -> None:
    c = Client(FakeStore(), tls=False, login=False)
    caps = c.cmd("a CAPABILITY")
    assert "STARTTLS" in caps[0] and "LOGINDISABLED" in caps[0] and "AUTH=PLAIN" not in caps[0]
    assert c.cmd('b LOGIN alice@example.test "pw"') == ["b NO [PRIVACYREQUIRED] LOGIN needs TLS first (STARTTLS)"]
    assert c.cmd("c SELECT INBOX") == ["c BAD SELECT not allowed in the not authenticated state"]
    assert c.cmd("d FROB") == ["d BAD Unknown command"]


def test_login_failure_and_sasl_plain() -> None:
    c = Client(FakeStore(), login=False)
    assert c.cmd("a LOGIN alice@example.test wrong") == ["a NO [AUTHENTICATIONFAILED] Authentication failed"]
    c.lines_in.append(base64.b64encode(b"\x00alice@example.test\x00pw"))
    out = c.cmd("b AUTHENTICATE PLAIN")
    assert out[0] == "+ " and out[1].startswith("b OK [CAPABILITY IMAP4rev1")
    assert "IDLE" in out[1]


def test_select_transcript() -> None:
    store = FakeStore()
    store.deliver("INBOX", PLAIN, ["\\Seen"])
    store.deliver("INBOX", MULTI, ["$Work"])
    c = Client(store)
    assert c.cmd("s SELECT inbox") == [
        "* 2 EXISTS",
        "* 0 RECENT",
        "* OK [UNSEEN 2] First unseen",
        "* OK [UIDVALIDITY 1000] UIDs valid",
        "* OK [UIDNEXT 3] Predicted next UID",
        "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work)",
        "* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work \\*)] Limited",
        "* OK [HIGHESTMODSEQ 3] Highest",
        "s OK [READ-WRITE] SELECT completed",
    ]
    assert c.cmd("t FETCH 1:* (UID FLAGS RFC822.SIZE)") == [
        f"* 1 FETCH (UID 1 FLAGS (\\Seen) RFC822.SIZE {len(PLAIN)})",
        f"* 2 FETCH (UID 2 FLAGS ($Work) RFC822.SIZE {len(MULTI)})",
        "t OK FETCH completed",
    ]
    assert c.cmd("u FETCH 3 FLAGS") == ["u BAD Invalid message sequence number"]


def test_fetch_sections_and_structure() -> None:
    store = FakeStore()
    store.deliver("INBOX", MULTI)
    c = Client(store)
    c.cmd("s EXAMINE INBOX")
    assert c.cmd("a FETCH 1 (BODY.PEEK[1] BODY.PEEK[2.MIME] BINARY.PEEK[2] BINARY.SIZE[2])") == [
        "* 1 FETCH (BODY[1] {8}",
        "part one BODY[2.MIME] {77}",
        "Content-Type: application/octet-stream",
        "Content-Transfer-Encoding: base64",
        "",
        " BINARY[2] ~{2}",
        "hi BINARY.SIZE[2] 2)",
        "a OK FETCH completed",
    ]
    out = c.cmd("b FETCH 1 BODYSTRUCTURE")
    assert out[0] == (
        '* 1 FETCH (BODYSTRUCTURE (("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 8 1 NIL NIL NIL NIL)'
        '("application" "octet-stream" NIL NIL NIL "BASE64" 4 NIL NIL NIL NIL) "mixed" ("boundary" "B") NIL NIL NIL))'
    )
    assert c.cmd("c FETCH 1 (BODY.PEEK[]<0.7> BODY.PEEK[9])") == [
        "* 1 FETCH (BODY[]<0> {7}",
        "Subject BODY[9] NIL)",
        "c OK FETCH completed",
    ]
    # EXAMINE is read-only: BODY[] does not set \Seen
    c.cmd("d FETCH 1 BODY[TEXT]")
    assert c.cmd("e FETCH 1 FLAGS") == ["* 1 FETCH (FLAGS ())", "e OK FETCH completed"]


def test_body_sets_seen_and_peek_does_not() -> None:
    store = FakeStore()
    store.deliver("INBOX", PLAIN)
    c = Client(store)
    c.cmd("s SELECT INBOX")
    assert c.cmd("a FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]")[:2] == [
        "* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {18}",
        "Subject: first",
    ]
    assert c.cmd("b FETCH 1 (BODY[TEXT])") == [
        "* 1 FETCH (BODY[TEXT] {13}",
        "hello world",
        " FLAGS (\\Seen))",
        "b OK FETCH completed",
    ]


def test_store_is_announced_to_another_session_and_expunge_waits() -> None:
    store = FakeStore()
    for _ in range(3):
        store.deliver("INBOX", PLAIN)
    a, b = Client(store), Client(store)
    a.cmd("s SELECT INBOX")
    b.cmd("s SELECT INBOX")
    assert a.cmd("x UID STORE 2 +FLAGS (\\Seen)") == ["* 2 FETCH (UID 2 FLAGS (\\Seen))", "x OK UID STORE completed"]
    assert b.cmd("n NOOP") == ["* 2 FETCH (UID 2 FLAGS (\\Seen))", "n OK NOOP completed"]
    a.cmd("y STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert a.cmd("z EXPUNGE") == ["* 1 EXPUNGE", "z OK EXPUNGE completed"]
    out = b.cmd("f FETCH 1 UID")  # no EXPUNGE during FETCH; MSN 1 still addresses UID 1 here
    assert out == ["* 1 FETCH (UID 1)", "f OK FETCH completed"]
    assert b.cmd("g UID FETCH 1:* UID") == [
        "* 1 EXPUNGE",
        "* 1 FETCH (UID 2)",
        "* 2 FETCH (UID 3)",
        "g OK UID FETCH completed",
    ]
    store.deliver("INBOX", PLAIN)
    assert b.cmd("h NOOP") == ["* 3 EXISTS", "h OK NOOP completed"]


def test_search_keys() -> None:
    store = FakeStore()
    store.deliver("INBOX", PLAIN, ["\\Seen"])
    store.deliver("INBOX", MULTI, ["\\Flagged"])
    c = Client(store)
    c.cmd("s SELECT INBOX")
    assert c.cmd("a SEARCH UNSEEN")[0] == "* SEARCH 2"
    assert c.cmd("b SEARCH OR SEEN FLAGGED")[0] == "* SEARCH 1 2"
    assert c.cmd('c SEARCH SUBJECT "MIX"')[0] == "* SEARCH 2"
    assert c.cmd("d SEARCH FROM bob NOT DELETED")[0] == "* SEARCH 1"
    assert c.cmd("e UID SEARCH BODY hello")[0] == "* SEARCH 1"
    assert c.cmd("f SEARCH SENTBEFORE 1-Jan-2000")[0] == "* SEARCH 1"
    assert c.cmd("g SEARCH LARGER 200 2:*")[0] == "* SEARCH 2"
    assert c.cmd("h SEARCH RETURN (MIN COUNT) ALL")[0] == '* ESEARCH (TAG "h") MIN 1 COUNT 2'
    assert c.cmd("i SEARCH CHARSET KOI8-R ALL") == ["i NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset"]
    assert c.cmd("j SEARCH RETURN (SAVE) FLAGGED") == ["j OK SEARCH completed"]
    assert c.cmd("k FETCH $ UID") == ["* 2 FETCH (UID 2)", "k OK FETCH completed"]
    c.cmd("l ENABLE IMAP4rev2")
    assert c.cmd("m UID SEARCH ALL")[0] == '* ESEARCH (TAG "m") UID ALL 1:2'


def test_append_copy_move_and_condstore() -> None:
    store = FakeStore()
    c = Client(store)
    c.cmd("s SELECT INBOX")
    out = c.send(b"a APPEND INBOX (\\Draft) {13}\r\n")
    assert out == ["+ Ready"]
    out = c.send(PLAIN[:13] + b"\r\n")
    assert out == ["* 1 EXISTS", "a OK [APPENDUID 1000 1] APPEND completed"]
    assert c.send(b"b APPEND INBOX {99999}\r\n") == ["b NO [TOOBIG] too large"]
    assert c.cmd("c UID COPY 1 Sent") == ["c OK [COPYUID 1001 1 1] UID COPY completed"]
    assert c.cmd("d UID COPY 1 Nope") == ["d NO [TRYCREATE] No such mailbox"]
    assert c.cmd("e MOVE 1 Trash") == ["* OK [COPYUID 1002 1 1] Moved", "* 1 EXPUNGE", "e OK MOVE completed"]
    c.cmd("f SELECT Sent (CONDSTORE)")
    assert c.cmd("g STORE 1 (UNCHANGEDSINCE 1) +FLAGS (\\Seen)") == ["g OK [MODIFIED 1] STORE completed"]
    out = c.cmd("h FETCH 1 (FLAGS) (CHANGEDSINCE 1)")
    assert out[0].startswith("* 1 FETCH (FLAGS (\\Draft) MODSEQ (")


def test_mailbox_management_and_list() -> None:
    c = Client(FakeStore())
    assert c.cmd("a CREATE Projects/2026") == ["a OK CREATE completed"]
    assert c.cmd("b CREATE Projects/2026") == ["b NO [ALREADYEXISTS] Mailbox exists already"]
    assert c.cmd('c LIST "" "*"') == [
        '* LIST (\\HasNoChildren) "/" INBOX',
        '* LIST (\\HasChildren) "/" Projects',
        '* LIST (\\HasNoChildren) "/" Projects/2026',
        '* LIST (\\HasNoChildren \\Sent) "/" Sent',
        '* LIST (\\HasNoChildren \\Trash) "/" Trash',
        "c OK LIST completed",
    ]
    assert c.cmd('d LIST "" ""') == ['* LIST (\\Noselect) "/" ""', "d OK LIST completed"]
    assert c.cmd("e0 RENAME Projects Projects/old") == ["e0 NO [CANNOT] Cannot rename to that name"]
    assert c.cmd("e RENAME Projects/2026 Done") == ["e OK RENAME completed"]
    assert c.cmd('f LIST (SPECIAL-USE) "" "*" RETURN (STATUS (MESSAGES))') == [
        '* LIST (\\HasNoChildren \\Sent) "/" Sent',
        "* STATUS Sent (MESSAGES 0)",
        '* LIST (\\HasNoChildren \\Trash) "/" Trash',
        "* STATUS Trash (MESSAGES 0)",
        "f OK LIST completed",
    ]
    assert c.cmd("g DELETE INBOX") == ["g NO [CANNOT] INBOX cannot be deleted"]
    assert c.cmd("h STATUS Done (MESSAGES UIDNEXT UNSEEN)") == [
        "* STATUS Done (MESSAGES 0 UIDNEXT 1 UNSEEN 0)",
        "h OK STATUS completed",
    ]
    assert c.cmd("i NAMESPACE") == ['* NAMESPACE (("" "/")) NIL NIL', "i OK NAMESPACE completed"]
    assert c.cmd("j ENABLE CONDSTORE X") == ["* ENABLED CONDSTORE", "j OK ENABLE completed"]


def test_bad_input_is_bad_not_a_crash() -> None:
    c = Client(FakeStore())
    assert c.cmd("a NOOP " + "(" * 100) == ["a BAD parentheses nested too deeply"]
    c.cmd("s SELECT INBOX")
    assert c.cmd("b FETCH x FLAGS")[0].startswith("b BAD")
    assert c.cmd("c FETCH 1:* (BODY[FOO])")[0].startswith("c BAD")
    assert c.cmd("d STORE 1 +FLAGS (\\Bogus)")[0].startswith("d BAD")
    assert c.cmd("e SEARCH FROB")[0].startswith("e BAD")
    assert c.send(b'f LOGIN "a\x00" b\r\n')[0].startswith("f BAD")
    assert c.cmd("g LOGOUT") == ["* BYE Postroom logging out", "g OK LOGOUT completed"]


def test_shared_snapshot_matches_a_fresh_listing() -> None:
    store = FakeStore()
    for _ in range(4):
        store.deliver("INBOX", PLAIN)
    shared = Snapshots()
    a = Client(store, snapshots=shared)
    a.cmd("s SELECT INBOX")
    a.cmd("x STORE 2 +FLAGS (\\Seen \\Deleted)")
    a.cmd("y EXPUNGE")
    store.deliver("INBOX", MULTI, ["$New"])
    a.cmd("z UID STORE 4 +FLAGS ($Late)")
    b, fresh = Client(store, snapshots=shared), Client(store)
    assert b.cmd("s SELECT INBOX") == fresh.cmd("s SELECT INBOX")
    assert b.cmd("f FETCH 1:* (UID FLAGS MODSEQ)") == fresh.cmd("f FETCH 1:* (UID FLAGS MODSEQ)")
    assert b.cmd("g FETCH 1:* (UID FLAGS)")[-2] == "* 4 FETCH (UID 5 FLAGS ($New))"


def test_fetch_of_many_bodies_streams_with_drains() -> None:
    store = FakeStore()
    big = PLAIN + b"x" * 30_000 + b"\r\n"
    for _ in range(10):
        store.deliver("INBOX", big)
    c = Client(store)
    c.cmd("s EXAMINE INBOX")
    out = c.cmd("f FETCH 1:* BODY.PEEK[]")
    assert out[-1] == "f OK FETCH completed"
    # the response went out in steps of about 64 KB, each followed by a drain, not built whole
    assert len(c.drains) >= 3
    assert all(b - a <= 64 * 1024 + len(big) + 100 for a, b in zip([0, *c.drains], c.drains, strict=False))


def test_header_fields_of_many_messages_come_from_the_structures() -> None:
    class Counting(FakeStore):
        reads = 0

        async def read_range(self, blob_id: int, offset: int, length: int) -> bytes:
            Counting.reads += 1
            return await super().read_range(blob_id, offset, length)

    store = Counting()
    for _ in range(5):
        store.deliver("INBOX", PLAIN)
    c = Client(store)
    c.cmd("s EXAMINE INBOX")
    out = c.cmd("f UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (Subject DATE)] RFC822.HEADER)")
    assert out[0] == "* 1 FETCH (UID 1 BODY[HEADER.FIELDS (SUBJECT DATE)] {56}"
    assert out[1:3] == ["Subject: first", "Date: Mon, 7 Feb 1994 21:52:25 -0800"]
    assert out[-1] == "f OK UID FETCH completed"
    assert Counting.reads == 0  # the first sync of a mail client costs no per-message read


def test_selected_mailbox_deleted_elsewhere_ends_the_session() -> None:
    store = FakeStore()
    a, b = Client(store), Client(store)
    a.cmd("c CREATE Old")
    a.cmd("s SELECT Old")
    assert b.cmd("d DELETE Old") == ["d OK DELETE completed"]
    a.cmd("n NOOP")
    assert a.session.bye == "selected mailbox was deleted or renamed"  # the adapter sends BYE and closes


def test_blob_cache_serves_repeated_fetches_without_the_store() -> None:
    from postroom.imap.blobcache import BlobCache

    class Counting(FakeStore):
        calls = 0

        async def read(self, blob_id: int) -> bytes:
            Counting.calls += 1
            return await super().read(blob_id)

        async def read_range(self, blob_id: int, offset: int, length: int) -> bytes:
            Counting.calls += 1
            return await super().read_range(blob_id, offset, length)

    store = Counting()
    store.deliver("INBOX", MULTI)
    c = Client(store)
    c.session.blob_cache = BlobCache(max_bytes=10_000)
    c.cmd("s EXAMINE INBOX")
    first = c.cmd("a FETCH 1 BODY.PEEK[]")
    assert Counting.calls == 1
    assert c.cmd("b FETCH 1 BODY.PEEK[]")[:-1] == first[:-1]
    assert c.cmd("c FETCH 1 (BODY.PEEK[1] BINARY.PEEK[2])")[:2] == ["* 1 FETCH (BODY[1] {8}", "part one BINARY[2] ~{2}"]
    assert Counting.calls == 1  # served from the cached bytes
    small = BlobCache(max_bytes=100)
    small.put(1, b"x" * 60)
    small.put(2, b"y" * 60)  # evicts 1
    assert small.get(1) is None and small.get(2) == b"y" * 60 and small.size == 60


def test_whole_message_fetch_reads_only_the_bytes() -> None:
    """``BODY.PEEK[]`` and ``BODY[]<partial>`` need no stored structure; ``BODY`` (the structure item) does."""

    class Counting(FakeStore):
        structure_calls = 0

        async def structures(self, blob_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
            Counting.structure_calls += 1
            return await super().structures(blob_ids)

    store = Counting()
    store.deliver("INBOX", PLAIN)
    c = Client(store)
    c.cmd("s SELECT INBOX")
    assert c.cmd("a UID FETCH 1 BODY.PEEK[]")[-1].startswith("a OK")
    assert c.cmd("b FETCH 1 BODY.PEEK[]<0.4>")[0] == "* 1 FETCH (BODY[]<0> {4}"
    assert Counting.structure_calls == 0
    assert c.cmd("c FETCH 1 BODY")[0].startswith("* 1 FETCH (BODY (")
    assert Counting.structure_calls == 1


def test_cached_fetch_lines_always_match_a_fresh_session() -> None:
    """``FETCH 1:* (FLAGS UID RFC822.SIZE)`` lines kept with the shared snapshot follow every change: a flag
    change by another session, an expunge that shifts the MSNs, a new message, the session's own STORE."""
    item = "(FLAGS UID RFC822.SIZE)"
    store = FakeStore()
    for _ in range(6):
        store.deliver("INBOX", PLAIN)
    shared = Snapshots()
    a, b = Client(store, snapshots=shared), Client(store, snapshots=shared)
    a.cmd("s SELECT INBOX")
    first = a.cmd(f"f FETCH 1:* {item}")
    assert first[1] == f"* 2 FETCH (UID 2 FLAGS () RFC822.SIZE {len(PLAIN)})"

    def check(client: Client) -> None:
        fresh = Client(store)
        fresh.cmd("s EXAMINE INBOX")
        assert client.cmd(f"f FETCH 1:* {item}") == fresh.cmd(f"f FETCH 1:* {item}")

    b.cmd("s SELECT INBOX")
    b.cmd("t STORE 2 +FLAGS (\\Flagged)")
    check(b)  # b's own change: its view differs from the snapshot at MSN 2
    a.cmd("n NOOP")
    check(a)
    b.cmd("x STORE 1,3 +FLAGS (\\Deleted)")
    b.cmd("y EXPUNGE")
    store.deliver("INBOX", MULTI, ["$New"])
    store.deliver("INBOX", PLAIN)
    c = Client(store, snapshots=shared)
    c.cmd("s SELECT INBOX")  # the snapshot catches up: MSNs shifted, as many messages as before
    check(c)
    a.cmd("n NOOP")
    check(a)
    many = Client(store, snapshots=shared)
    many.cmd("s SELECT INBOX")
    many.cmd("z STORE 1:* +FLAGS (\\Seen)")
    d = Client(store, snapshots=shared)
    d.cmd("s SELECT INBOX")
    check(d)


def test_own_store_is_not_read_back_but_others_changes_are() -> None:
    class Counting(FakeStore):
        rows_read = 0

        async def changes_since(self, mailbox_id: int, modseq: int) -> Any:
            changes = await super().changes_since(mailbox_id, modseq)
            Counting.rows_read += len(changes.changed)
            return changes

    store = Counting()
    for _ in range(3):
        store.deliver("INBOX", PLAIN)
    a, b = Client(store), Client(store)
    a.cmd("s SELECT INBOX")
    b.cmd("s SELECT INBOX")
    assert a.cmd("t UID STORE 1:2 +FLAGS (\\Seen)")[:2] == [
        "* 1 FETCH (UID 1 FLAGS (\\Seen))",
        "* 2 FETCH (UID 2 FLAGS (\\Seen))",
    ]
    assert a.cmd("f FETCH 3 BODY[]")[0].startswith("* 3 FETCH (BODY[] {")  # sets \Seen too (FLAGS follow)
    assert a.cmd("n NOOP") == ["n OK NOOP completed"]
    assert Counting.rows_read == 0  # a's own changes were never read back
    assert b.cmd("n NOOP")[:3] == [  # b learns all three from the store
        "* 1 FETCH (UID 1 FLAGS (\\Seen))",
        "* 2 FETCH (UID 2 FLAGS (\\Seen))",
        "* 3 FETCH (UID 3 FLAGS (\\Seen))",
    ]
    assert Counting.rows_read == 3
    b.cmd("x STORE 1 +FLAGS (\\Flagged)")  # a change a has not seen: a's next STORE must not skip it
    assert a.cmd("y STORE 2 +FLAGS (\\Answered)")[:2] == [
        "* 2 FETCH (FLAGS (\\Answered \\Seen))",
        "* 1 FETCH (UID 1 FLAGS (\\Flagged \\Seen))",
    ]
