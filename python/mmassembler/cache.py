"""The embedding cache: item key -> embedding rows, LRU, bounded in bytes.

An entry whose row count no longer matches the item asking for it (a key collision, or
a reused client-provided id) is dropped and re-encoded. On CUDA, an entry read by a
batch on some stream is freed only after that stream's queued work (``record_stream``).
"""

from __future__ import annotations

import logging
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


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._streams: dict[int, set] = {}
        self.stats = CacheStats()

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes held now (never more than ``max_bytes``)."""
        return self.stats.bytes

    def get(self, key: int, rows: int | None = None) -> torch.Tensor | None:
        """The entry for ``key`` (marked most recent), or ``None``.

        With ``rows``, an entry of another row count is a collision: it is dropped,
        logged, and ``None`` is returned so the caller re-encodes.
        """
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        if rows is not None and entry.shape[0] != rows:
            logger.warning("embedding cache: entry %d holds %d rows but the item needs %d; "
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
        if key in self._entries:
            logger.warning("embedding cache: dropping entry %r: %s", key, reason)
            self.stats.collisions += 1
            self._drop(key)

    def peek(self, key: int) -> torch.Tensor | None:
        """The entry for ``key`` without touching recency or counters."""
        return self._entries.get(key)

    def put(self, key: int, value: torch.Tensor) -> bool:
        """Insert or replace ``key``; evict least-recent entries to stay within budget.

        Returns False (and caches nothing) when ``value`` alone exceeds the budget.
        """
        size = _nbytes(value)
        if key in self._entries:
            self._drop(key)
        if size > self.max_bytes:
            self.stats.rejected += 1
            return False
        while self.stats.bytes + size > self.max_bytes:
            old = next(iter(self._entries))
            self._drop(old)
            self.stats.evictions += 1
        self._entries[key] = value
        self.stats.bytes += size
        return True

    def record_use(self, key: int, stream) -> None:
        """Note that work queued on ``stream`` reads entry ``key`` (CUDA only)."""
        if key in self._entries:
            self._streams.setdefault(key, set()).add(stream)

    def clear(self) -> None:
        """Drop every entry (counters other than ``bytes`` are kept)."""
        for key in list(self._entries):
            self._drop(key)

    def _drop(self, key: int) -> None:
        value = self._entries.pop(key)
        self.stats.bytes -= _nbytes(value)
        for stream in self._streams.pop(key, ()):
            # The allocator will not reuse the memory before this stream's queued work.
            value.record_stream(stream)
