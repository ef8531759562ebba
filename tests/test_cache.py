"""EmbeddingCache: byte budget, LRU order, collisions, oversized entries (stateful model test)."""

from collections import OrderedDict

import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mmassembler import EmbeddingCache


class CacheModel(RuleBasedStateMachine):
    """The cache against a plain OrderedDict model of LRU-by-bytes."""

    BUDGET = 4 * 100 * 4  # four entries of 100 float32 values

    def __init__(self):
        super().__init__()
        self.cache = EmbeddingCache(self.BUDGET)
        self.model: OrderedDict[int, int] = OrderedDict()  # key -> rows (width 4, float32)

    def _model_bytes(self):
        return sum(rows * 16 for rows in self.model.values())

    @rule(key=st.integers(0, 9), rows=st.integers(1, 120))
    def put(self, key, rows):
        stored = self.cache.put(key, torch.full((rows, 4), float(key)))
        self.model.pop(key, None)
        if rows * 16 > self.BUDGET:
            assert not stored
            return
        assert stored
        while self._model_bytes() + rows * 16 > self.BUDGET:
            self.model.popitem(last=False)
        self.model[key] = rows

    @rule(key=st.integers(0, 9), rows=st.one_of(st.none(), st.integers(1, 120)))
    def get(self, key, rows):
        got = self.cache.get(key, rows=rows)
        if key not in self.model:
            assert got is None
        elif rows is not None and rows != self.model[key]:
            assert got is None  # a collision drops the entry
            del self.model[key]
        else:
            assert got is not None and got.shape[0] == self.model[key]
            assert torch.equal(got, torch.full((self.model[key], 4), float(key)))
            self.model.move_to_end(key)

    @rule()
    def clear(self):
        self.cache.clear()
        self.model.clear()

    @invariant()
    def within_budget_and_same_contents(self):
        assert self.cache.bytes <= self.BUDGET
        assert self.cache.bytes == self._model_bytes()
        assert len(self.cache) == len(self.model)
        assert all(k in self.cache for k in self.model)


TestCacheModel = CacheModel.TestCase


def test_stats_count_hits_misses_evictions_collisions():
    cache = EmbeddingCache(2 * 8 * 4)
    cache.put(1, torch.zeros(1, 8))
    cache.put(2, torch.zeros(1, 8))
    assert cache.get(1) is not None and cache.get(3) is None
    cache.put(3, torch.zeros(1, 8))  # evicts 2, the least recent
    assert 2 not in cache and 1 in cache
    assert cache.get(1, rows=5) is None and 1 not in cache
    s = cache.stats
    assert (s.hits, s.misses, s.evictions, s.collisions) == (1, 2, 1, 1)


def test_oversized_entry_is_not_cached():
    cache = EmbeddingCache(100)
    cache.put(1, torch.zeros(2, 2))
    assert cache.put(2, torch.zeros(100, 2)) is False
    assert 2 not in cache and 1 in cache and cache.stats.rejected == 1
