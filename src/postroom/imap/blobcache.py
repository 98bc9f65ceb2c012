"""A small per-process LRU of message bytes, keyed by the store's ``blob_id``.

Safe because stored bytes never change (store invariant "immutable bytes"); it saves the store round trip
when a message is fetched again (a client fetching the header, then the body; several clients of one
user). Pure data structure, no I/O.

Invariants: at most ``max_bytes`` octets are held; entries larger than ``max_entry`` are never kept.
"""

from __future__ import annotations

from collections import OrderedDict

BODY_CACHE_BYTES = 32 * 1024 * 1024  # per worker process
MAX_ENTRY = 1024 * 1024  # larger messages are not cached


class BlobCache:
    def __init__(self, max_bytes: int = BODY_CACHE_BYTES, max_entry: int = MAX_ENTRY) -> None:
        self.max_bytes = max_bytes
        self.max_entry = max_entry
        self.size = 0
        self._items: OrderedDict[int, bytes] = OrderedDict()

    def get(self, blob_id: int) -> bytes | None:
        data = self._items.get(blob_id)
        if data is not None:
            self._items.move_to_end(blob_id)
        return data

    def put(self, blob_id: int, data: bytes) -> None:
        if len(data) > self.max_entry or blob_id in self._items or self.max_bytes <= 0:
            return
        self._items[blob_id] = data
        self.size += len(data)
        while self.size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.size -= len(old)
