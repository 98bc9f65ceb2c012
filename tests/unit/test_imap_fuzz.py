"""Hypothesis: any command line, well-formed or not, gets BAD/NO/OK — never an internal error."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imap_fake_store import FakeStore
from test_imap_session import MULTI, PLAIN, Client

VERBS = [
    "FETCH", "UID FETCH", "STORE", "UID STORE", "SEARCH", "UID SEARCH", "COPY", "UID MOVE", "EXPUNGE",
    "UID EXPUNGE", "SELECT", "EXAMINE", "STATUS", "LIST", "LSUB", "CREATE", "RENAME", "DELETE", "APPEND",
    "ENABLE", "ID", "NAMESPACE", "NOOP", "CHECK", "SUBSCRIBE", "UNSELECT",
]  # fmt: skip
WORDS = [
    "1", "2", "*", "1:*", "2:3", "$", "0", "4294967296", "FLAGS", "UID", "BODY[]", "BODY.PEEK[1.MIME]",
    "BODY[HEADER.FIELDS (SUBJECT)]", "BODY[2.1.TEXT]<0.5>", "BINARY[2]", "BINARY.SIZE[1]", "ENVELOPE",
    "BODYSTRUCTURE", "RFC822", "RFC822.HEADER", "MODSEQ", "+FLAGS", "-FLAGS.SILENT", "FLAGS.SILENT",
    "\\\\Seen", "\\\\Deleted", "$Work", "(\\\\Seen $Work)", "(UNCHANGEDSINCE 1)", "(CHANGEDSINCE 1 VANISHED)",
    "INBOX", "Trash", "Nope", '""', '"*"', "%", "(MESSAGES UIDNEXT HIGHESTMODSEQ)", "ALL", "UNSEEN", "OR",
    "NOT", "SUBJECT", "TEXT", "hello", "SINCE", "1-Jan-2000", "LARGER", "RETURN", "(MIN MAX COUNT SAVE)",
    "CHARSET", "UTF-8", "(", ")", "NIL", "{3+}\\r\\nabc", "CONDSTORE", "QRESYNC", "IMAP4rev2",
    "(QRESYNC (1000 1 1:5))", "(USE (\\\\Sent))", "RETURN (STATUS (MESSAGES))", "(SPECIAL-USE)",
]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(VERBS), st.lists(st.sampled_from(WORDS), max_size=6)), max_size=6))
def test_no_command_causes_an_internal_error(script: list[tuple[str, list[str]]]) -> None:
    store = FakeStore()
    store.deliver("INBOX", PLAIN, ["\\Seen"])
    store.deliver("INBOX", MULTI)
    c = Client(store)
    c.cmd("s SELECT INBOX")
    for n, (verb, words) in enumerate(script):
        line = f"t{n} {verb} {' '.join(words)}".replace("\\r\\n", "\r\n")
        out = c.send(line.encode() + b"\r\n")
        assert not any("SERVERBUG" in x for x in out), (line, out)
