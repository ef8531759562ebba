"""The embedding cache: item key -> embedding rows, LRU, bounded in bytes.

The budget counts the storage each entry keeps alive (a view of a larger tensor keeps
all of it), each storage once however many entries share it. An entry whose row count
no longer matches the item asking for it (a key collision, or a reused client-provided
id) is dropped and re-encoded. On CUDA, an entry read by a batch on some stream is freed
only after that stream's queued work (``record_stream``). Every method takes a lock:
threads may share one cache.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class CacheStats:
    """Counters since the cache was made (``clear`` keeps them)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    collisions: int = 0
    rejected: int = 0  # puts larger than the whole budget
    bytes: int = 0  # bytes held now


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of the storage ``t`` keeps alive."""
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


class EmbeddingCache:
    """LRU map from item key to embedding tensor, holding at most ``max_bytes``.

    Example
    -------
    >>> cache = EmbeddingCache(max_bytes=1 << 20)
    >>> cache.put(7, torch.zeros(4, 8))
    True
    >>> cache.get(7, rows=4).shape, cache.get(7, rows=5), 7 in cache
    (torch.Size([4, 8]), None, False)
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"Invalid max_bytes: expected >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict = OrderedDict()
        self._streams: dict = {}
        self._storages: dict[int, list[int]] = {}  # storage identity -> [bytes, entries using it]
        self._lock = threading.RLock()
        self.stats = CacheStats()

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes of storage held now (never more than ``max_bytes``)."""
        return self.stats.bytes

    def get(self, key, rows: int | None = None) -> torch.Tensor | None:
        """The entry for ``key`` (marked most recent), or ``None``.

        With ``rows``, an entry of another row count is a collision: it is dropped,
        logged, and ``None`` is returned so the caller re-encodes.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            if rows is not None and entry.shape[0] != rows:
                logger.warning("embedding cache: entry %r holds %d rows but the item needs %d; "
                               "dropping it (key collision or reused id)", key, entry.shape[0], rows)
                self.stats.collisions += 1
                self.stats.misses += 1
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry

    def discard(self, key, reason: str) -> None:
        """Drop ``key``'s entry because it no longer fits its item (counted as a collision)."""
        with self._lock:
            if key in self._entries:
                logger.warning("embedding cache: dropping entry %r: %s", key, reason)
                self.stats.collisions += 1
                self._drop(key)

    def peek(self, key) -> torch.Tensor | None:
        """The entry for ``key`` without touching recency or counters."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key, value: torch.Tensor) -> bool:
        """Insert or replace ``key``; evict least-recent entries to stay within budget.

        Returns False (and caches nothing) when the storage ``value`` keeps alive exceeds
        the whole budget.
        """
        ident, full = _storage(value)
        with self._lock:
            if key in self._entries:
                self._drop(key)
            if full > self.max_bytes:
                self.stats.rejected += 1
                return False
            # a storage already held for another entry costs nothing more
            while self.stats.bytes + (0 if ident in self._storages else full) > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.stats.evictions += 1
            use = self._storages.setdefault(ident, [full, 0])
            if use[1] == 0:
                self.stats.bytes += full
            use[1] += 1
            self._entries[key] = value
            return True

    def record_use(self, key, stream) -> None:
        """Note that work queued on ``stream`` reads entry ``key`` (CUDA only)."""
        with self._lock:
            if key in self._entries:
                self._streams.setdefault(key, set()).add(stream)

    def clear(self) -> None:
        """Drop every entry (counters other than ``bytes`` are kept)."""
        with self._lock:
            for key in list(self._entries):
                self._drop(key)

    def _drop(self, key) -> None:
        value = self._entries.pop(key)
        ident = _storage(value)[0]
        use = self._storages[ident]
        use[1] -= 1
        if use[1] == 0:
            del self._storages[ident]
            self.stats.bytes -= use[0]
        for stream in self._streams.pop(key, ()):
            # The allocator will not reuse the memory before this stream's queued work.
            value.record_stream(stream)
