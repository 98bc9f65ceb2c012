"""Message structure computed once at delivery ("parse once").

:func:`analyze` turns a message's bytes into a JSON-able dict that the store keeps beside the message;
IMAP FETCH (ENVELOPE, BODYSTRUCTURE, BODY[section], RFC822.HEADER …) and SEARCH read it instead of
re-parsing. :func:`searchable_text` is what the full-text index holds. Pure functions only: no I/O, no
store, no asyncio.
"""

from postroom.mime.analyze import STRUCTURE_VERSION, analyze, minimal_structure, searchable_text, split_header

__all__ = ["STRUCTURE_VERSION", "analyze", "minimal_structure", "searchable_text", "split_header"]
