"""The cache owns what it keeps, checks hits like precomputed embeddings, counts the
storage entries keep alive, and is safe for threads."""

import random
import threading

import pytest
import torch

from mmassembler import cache_key, Assembler, EmbeddingCache, Item, Request, assemble, assemble_oracle

H = 8


def _reusing_encoder(device):
    """Like a CUDA-graph-captured tower: every call returns views of one buffer it overwrites."""
    buf = torch.empty(64, H, device=device)

    def encode(items):
        out, row = [], 0
        for it in items:
            buf[row:row + it.data].fill_(float(it.key))
            out.append(buf[row:row + it.data])
            row += it.data
        return out

    return encode


@pytest.mark.parametrize("path", ["stateless", "assembler"])
def test_cache_owns_entries_of_an_encoder_that_reuses_its_buffer(device, path):
    weight = torch.randn(5, H, device=device)
    cache = EmbeddingCache(1 << 20)
    enc = {"image": _reusing_encoder(device)}
    ids = torch.zeros(4, dtype=torch.long, device=device)
    asm = Assembler(weight=weight, max_tokens=8, max_requests=1, encoders=enc, cache=cache)
    for key in (1, 2):  # the second call overwrites the buffer the first returned
        item = Item(key, [(0, 3)], data=4)
        if path == "stateless":
            assemble([Request([item], 0, 4)], ids, weight=weight, encoders=enc, cache=cache)
        else:
            h = asm.add_request([item])
            asm.assemble([h], [0], [4], ids)
            asm.remove_request(h)
    key = lambda k: cache_key(enc["image"], k)  # noqa: E731
    assert torch.equal(cache.peek(key(1)), torch.full((4, H), 1.0, device=device))  # a hit gives key 1's rows
    assert torch.equal(cache.peek(key(2)), torch.full((4, H), 2.0, device=device))


@pytest.mark.parametrize("entry", ["wider", "float64", "int"])
@pytest.mark.parametrize("path", ["stateless", "assembler"])
def test_a_cache_hit_gets_the_checks_of_a_precomputed_embedding(device, path, entry):
    weight = torch.randn(5, H, device=device)
    cache = EmbeddingCache(1 << 20)
    bad = {"wider": torch.randn(3, 2 * H), "float64": torch.randn(3, H, dtype=torch.float64),
           "int": torch.zeros(3, H, dtype=torch.int32)}[entry].to(device)
    enc = {"image": lambda items: [torch.full((3, H), 5.0, device=device) for _ in items]}
    cache.put(cache_key(enc["image"], 5), bad)  # e.g. a cache shared with another model
    item = Item(5, [(1, 3)])
    ids = torch.zeros(4, dtype=torch.long, device=device)
    if path == "stateless":
        got = assemble([Request([item], 0, 4)], ids, weight=weight, encoders=enc, cache=cache)
    else:
        asm = Assembler(weight=weight, max_tokens=8, max_requests=1, encoders=enc, cache=cache)
        got = asm.assemble([asm.add_request([item])], [0], [4], ids)
    assert torch.equal(got[1:4], torch.full((3, H), 5.0, device=device))  # re-encoded, not truncated
    assert torch.equal(cache.peek(cache_key(enc["image"], 5)), torch.full((3, H), 5.0, device=device))


def test_budget_counts_storage_once_per_storage(device):
    wide = torch.randn(10, 4 * H, device=device)
    cache = EmbeddingCache(max_bytes=wide.untyped_storage().nbytes())
    assert cache.put(1, wide[:, :H])  # a column slice keeps the whole wide tensor alive
    assert cache.bytes == wide.untyped_storage().nbytes()
    assert cache.put(2, wide[:5])  # the same storage: no more bytes, no eviction
    assert cache.bytes == wide.untyped_storage().nbytes() and len(cache) == 2
    assert not cache.put(3, torch.randn(10, 5 * H, device=device))  # larger than the budget
    cache.put(4, torch.randn(2, H, device=device))  # evicts both views: their storage goes
    assert len(cache) == 1 and cache.bytes == 2 * H * 4
    cache.clear()
    assert cache.bytes == 0


def _held_bytes(cache):
    seen = {}
    for key in list(cache._entries):
        st = cache.peek(key).untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("shared", ["cache", "assembler"])
def test_threads_share_a_cache_and_an_assembler(device, shared):
    threads, calls = 8, 300
    weight = torch.randn(30, H, device=device)
    cache = EmbeddingCache(max_bytes=6 * 4 * H * 4)  # about six entries: constant eviction

    def encode(items):
        return [torch.full((it.data, H), float(it.key[0]), device=device) for it in items]

    enc = {"image": encode}
    asm = Assembler(weight=weight, max_tokens=64, max_requests=threads * 2, encoders=enc, cache=cache)
    errors, lock = [], threading.Lock()

    def work(seed):
        rng = random.Random(seed)
        try:
            for _ in range(calls):
                k = rng.randrange(12)
                item = Item((k, 4), [(2, 5)], data=4)
                n = rng.randrange(6, 12)
                ids = torch.randint(0, 30, (n,), device=device)
                if shared == "cache":
                    got = assemble([Request([item], 0, n)], ids, weight=weight, encoders=enc, cache=cache,
                                   backend="torch")
                else:
                    h = asm.add_request([item], prompt_len=12)
                    got = asm.assemble([h], [0], [n], ids)
                    asm.remove_request(h)
                want, _ = assemble_oracle([Request([item], 0, n)], ids.cpu(),
                                          lambda it: torch.full((4, H), float(it.key[0])),
                                          weight=weight.cpu())
                if not torch.equal(got.cpu(), want):
                    raise AssertionError(f"thread {seed}: wrong rows")
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            with lock:
                errors.append(exc)

    pool = [threading.Thread(target=work, args=(s,)) for s in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors[:3]
    assert cache.bytes == _held_bytes(cache) <= cache.max_bytes
    assert cache.stats.evictions > 0 and cache.stats.hits > 0


def test_own_block_always_copies(device):
    from mmassembler.embeddings import own_block

    t = torch.randn(4, H, device=device)
    for target in (torch.device(device), torch.device(device.split(":")[0])):
        for parts in ([t], [t[:1], t[1:]]):
            c, starts = own_block(parts, target, (0, 1))
            assert c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() and torch.equal(c, t)
            assert starts == [0, 1][:len(parts)]
