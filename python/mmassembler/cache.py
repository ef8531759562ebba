"""The embedding cache: (encoder identity, modality, item key) -> embedding rows, LRU,
bounded in bytes.

One item key may mean different rows to two models or two modalities, so the assembler
keys every entry by the identity of the encoder that made it and the modality as well as
the item's key (``entry_key``). The budget counts the storage each entry keeps alive (a
view of a larger tensor keeps all of it), each storage once however many entries share
it: a step's encoded items are views of one block the library owns. An entry whose
format or row count no longer matches the item asking for it (a key collision, or a
reused client-provided id) is dropped and re-encoded. Readers hold what they read until
their kernels have run, so eviction never frees memory a queued step reads. Every method
takes a lock: threads may share one cache.
"""

from __future__ import annotations

import itertools
from itertools import repeat
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from mmassembler.errors import BatchShapeError
from mmassembler.identity import ObjectState

logger = logging.getLogger(__name__)


@dataclass
class CacheStats:
    """Counters since the cache was made (``clear`` keeps them)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    collisions: int = 0  # entries dropped because they no longer fit their item
    rejected: int = 0  # puts larger than the whole budget
    bytes: int = 0  # bytes of storage held now
    entries: int = 0  # entries held now


# An entry kept as rows ``[start, start + rows)`` of a block the library owns (a step's
# encoded items share one block: no tensor is made per entry) is a plain tuple ``(block,
# start, rows, ident)``, ``ident`` naming the block's storage (a named tuple would cost a
# Python call per entry to make); any other entry is a tensor.
BLOCK_ROWS = tuple


def _view(entry):
    """An entry as a tensor (block rows as a view of their block)."""
    return entry[0][entry[1]:entry[1] + entry[2]] if type(entry) is tuple else entry


def _rows(entry) -> int:
    return entry[2] if type(entry) is tuple else entry.shape[0]


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of the storage ``t`` keeps alive."""
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


_tokens = itertools.count(1)
_token_lock = threading.Lock()


class EmbeddingCache:
    """LRU map from ``(encoder identity, modality, item key)`` to an embedding tensor,
    holding at most ``max_bytes`` of storage.

    Example
    -------
    >>> cache = EmbeddingCache(max_bytes=1 << 20)
    >>> cache.put(7, torch.zeros(4, 8))
    True
    >>> cache.get(7, rows=4).shape, cache.get(7, rows=5), 7 in cache
    (torch.Size([4, 8]), None, False)
    """

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise BatchShapeError(f"Invalid max_bytes: expected an int >= 0, got {max_bytes!r}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict = OrderedDict()
        self._storages: dict[int, list[int]] = {}  # storage identity -> [bytes, entries using it]
        self._ident: dict = {}  # key -> its entry's storage identity
        self._lock = threading.RLock()
        self.stats = CacheStats()

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __repr__(self) -> str:
        s = self.stats
        return (f"EmbeddingCache({s.entries} entries, {s.bytes}/{self.max_bytes} bytes, "
                f"{s.hits} hits, {s.misses} misses, {s.evictions} evictions)")

    @property
    def bytes(self) -> int:
        """Bytes of storage held now (never more than ``max_bytes``)."""
        return self.stats.bytes

    def get(self, key, rows: int | None = None) -> torch.Tensor | None:
        """The entry for ``key`` (marked most recent), or ``None`` (a miss).

        With ``rows``, an entry of another row count is a collision: it is dropped,
        logged, and ``None`` is returned so the caller re-encodes.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and rows is not None and _rows(entry) != rows:
                self._collide(key, f"it holds {_rows(entry)} rows but the item needs {rows}")
                entry = None
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return _view(entry)

    def lookup(self, keys: list) -> list:
        """The raw entries of ``keys`` (a tensor, block rows, or ``None``), touching
        nothing: a step reads its candidates here, checks them, then settles hits and
        misses in ``commit``."""
        with self._lock:
            return list(map(self._entries.get, keys))

    def commit(self, hits: list, misses: int, stale: list, puts: list) -> int:
        """A step's outcome in one call: ``hits`` (keys read, marked most recent), ``misses``
        counted, ``stale`` entries dropped (they did not fit their item), then ``puts``:
        per block ``(keys, block, starts, rows)``, each key's rows block rows of the
        block (its storage counted once). Returns how many were put."""
        with self._lock:
            move = self._entries.move_to_end
            for k in hits:
                if k in self._entries:
                    move(k)
            self.stats.hits += len(hits)
            self.stats.misses += misses
            for k in stale:
                if k in self._entries:
                    self._collide(k, "its rows, width, dtype or device do not fit the item")
            put = 0
            for keys, block, starts, rows in puts:
                put += self._put_block(keys, block, starts, rows)
            return put

    def _put_block(self, keys: list, block: torch.Tensor, starts, rows) -> int:
        """Put every key as rows of one block: one budget check for the block's storage."""
        store = _storage(block)
        if not self._admit(keys, store):
            return 0
        ident = store[0]
        self._entries.update(zip(keys, zip(repeat(block), starts, rows, repeat(ident))))
        self._ident.update(zip(keys, repeat(ident)))
        return len(keys)

    def _admit(self, keys: list, store: tuple) -> bool:
        """Make room for ``keys`` whose entries keep storage ``store`` alive (replaced keys
        dropped, least-recent entries evicted) and count it; False when it exceeds the
        whole budget (nothing is then put)."""
        ident, full = store
        for k in [k for k in keys if k in self._entries]:
            self._drop(k)
        if full > self.max_bytes:
            self.stats.rejected += len(keys)
            return False
        # a storage already held for another entry costs nothing more
        while self.stats.bytes + (0 if ident in self._storages else full) > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1
        use = self._storages.setdefault(ident, [full, 0])
        if use[1] == 0:
            self.stats.bytes += full
        use[1] += len(keys)
        self.stats.entries += len(keys)
        return True

    def peek(self, key) -> torch.Tensor | None:
        """The entry for ``key`` without touching recency or counters."""
        with self._lock:
            return _view(self._entries.get(key))

    def put(self, key, value: torch.Tensor) -> bool:
        """Insert or replace ``key``; evict least-recent entries to stay within budget.

        Returns False (and caches nothing) when the storage ``value`` keeps alive exceeds
        the whole budget.
        """
        store = _storage(value)
        with self._lock:
            return self._put(key, value, store)

    def clear(self) -> None:
        """Drop every entry (counters other than ``bytes`` and ``entries`` are kept)."""
        with self._lock:
            for key in list(self._entries):
                self._drop(key)

    def _put(self, key, value, store) -> bool:
        if not self._admit([key], store):
            return False
        self._entries[key] = value
        self._ident[key] = store[0]
        return True

    def _collide(self, key, reason: str) -> None:
        logger.warning("embedding cache: dropping entry %r: %s (key collision or reused id)", key, reason)
        self.stats.collisions += 1
        self._drop(key)

    def _drop(self, key) -> None:
        self._entries.pop(key)
        ident = self._ident.pop(key)
        use = self._storages[ident]
        use[1] -= 1
        self.stats.entries -= 1
        if use[1] == 0:
            del self._storages[ident]
            self.stats.bytes -= use[0]


_identities = ObjectState()


def encoder_token(fn) -> object:
    """A process-unique identity for an encoder, for ``entry_key``: a bound method's
    instance (by a token) and function, or the callable's token. Tokens are kept beside
    the objects weakly, so a later object at the same address gets a new one; an object
    that takes no weak reference gets a token of its own every time (nothing is shared)."""
    owner = getattr(fn, "__self__", None)
    func = getattr(fn, "__func__", None)
    if owner is not None and func is not None:
        return (_token_of(owner), func)
    return _token_of(fn)


def _token_of(obj) -> int:
    found = _identities.get(obj)
    if found is None:
        with _token_lock:
            found = _identities.get(obj)
            if found is None:
                found = next(_tokens)
                _identities.set(obj, found)
    return found


def entry_key(token, modality: str, key) -> tuple:
    """The cache key of an item: the encoder's identity, the modality and the item key."""
    return (token, modality, key)


def cache_key(encoder, key, modality: str = "image") -> tuple:
    """The key under which the assembler caches ``key``'s rows made by ``encoder`` (a
    callable or an ``Encoder``) for ``modality``: use it to prefill or inspect a cache."""
    ident = getattr(encoder, "identity", None)
    fn = ident if ident is not None else getattr(encoder, "fn", encoder)
    return entry_key(encoder_token(fn), modality, key)
