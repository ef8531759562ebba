"""Soak (slow; run on a GPU): many random batches through assemble with a cache that evicts
constantly, each checked against the reference, allocated memory flat after warm-up.

    HYPOTHESIS_PROFILE=gpu pytest -m slow tests/test_soak.py
"""

import os

import pytest
import torch

from mmassembler import EmbeddingCache, Item, Request, assemble

pytestmark = pytest.mark.slow

BATCHES = int(os.environ.get("MMKERNELS_SOAK_BATCHES", "2000"))
H = 256


def _embedding(key: int, rows: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(key * 7919 + rows)
    return torch.randn(rows, H, generator=g).to(device)


def _random_batch(rng: torch.Generator, device):
    requests = []
    for _ in range(int(torch.randint(1, 9, (1,), generator=rng))):
        pos, items = int(torch.randint(0, 8, (1,), generator=rng)), []
        for _ in range(int(torch.randint(0, 4, (1,), generator=rng))):
            key = int(torch.randint(0, 64, (1,), generator=rng))  # a small pool: hits and evictions
            rows = 8 + key % 24  # rows follow the key, as content hashes do
            items.append(Item(key, [(pos, pos + rows - 1)], data=rows))
            pos += rows + int(torch.randint(0, 6, (1,), generator=rng))
        prompt = pos + 3
        prefix = int(torch.randint(0, prompt, (1,), generator=rng))
        extend = int(torch.randint(0, prompt - prefix + 1, (1,), generator=rng))
        requests.append(Request(items, prefix, extend, prompt_len=prompt))
    return requests


def test_soak(device):
    rng = torch.Generator().manual_seed(1234)
    cache = EmbeddingCache(max_bytes=12 * 20 * H * 4)  # a dozen entries: evicts constantly

    def encode(items):
        return [_embedding(it.key, it.data, device) for it in items]

    weight = torch.randn(100, H, device=device).bfloat16()
    mem = []
    for i in range(BATCHES):
        requests = _random_batch(rng, device)
        n = sum(r.extend_len for r in requests)
        ids = torch.randint(-5, 110, (n,), generator=rng).to(device)
        got = assemble(requests, ids, weight=weight, encoders={"image": encode}, cache=cache)
        want = assemble(requests, ids, weight=weight, encoders={"image": encode}, backend="torch")
        assert torch.equal(got, want), f"batch {i}"
        del got, want
        if device == "cuda":
            mem.append(torch.cuda.memory_allocated())
    assert cache.bytes <= cache.max_bytes and cache.stats.evictions > BATCHES // 10
    if mem:
        warm = mem[len(mem) // 10:]
        first, last = warm[: len(warm) // 2], warm[len(warm) // 2:]
        assert max(last) <= max(first) + (1 << 20), (max(first), max(last))
