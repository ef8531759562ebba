"""Encoder batching across requests, dedupe by key, cache reuse across chunks, mixed sources."""

import pytest
import torch

from mmassembler import cache_key, EmbeddingCache, Encoder, Item, Request, assemble, assemble_oracle
from mmassembler import Assembler

H = 16


def image_embedding(key: int, rows: int, width: int = H) -> torch.Tensor:
    """What the fake encoder returns for an image: a function of its key only."""
    g = torch.Generator().manual_seed(key)
    return torch.randn(rows, width, generator=g)


class CountingEncoder:
    """Returns per-item tensors whose rows come from the item's own data (its 'size')."""

    def __init__(self, concatenated: bool = False, width: int = H):
        self.calls: list[list[int]] = []
        self.concatenated = concatenated
        self.width = width

    def __call__(self, items):
        self.calls.append([it.key for it in items])
        outs = [image_embedding(it.key, it.data["rows"], self.width) for it in items]
        if self.concatenated:
            return torch.cat(outs), [t.shape[0] for t in outs]
        return outs


def image(key, start, rows):
    return Item(key, [(start, start + rows - 1)], data={"rows": rows})


def _oracle_embedding(item):
    return item.embedding if item.embedding is not None else image_embedding(item.key, item.data["rows"])


def eight_requests(prefix, extend):
    """8 requests x 3 images; keys repeat across requests (10, 11 in every request)."""
    reqs = []
    for r in range(8):
        items = [image(10, 5, 12), image(11, 20, 12), image(100 + r, 40, 12)]
        reqs.append(Request(items, prefix, extend))
    return reqs


@pytest.mark.parametrize("concatenated", [False, True])
def test_one_call_per_modality_each_key_once_then_cache(concatenated):
    enc = CountingEncoder(concatenated)
    cache = EmbeddingCache(1 << 24)
    weight = torch.randn(50, H)
    # chunk 1: positions [0, 46) cut through the third image (40..51)
    reqs = eight_requests(0, 46)
    ids = torch.randint(0, 50, (8 * 46,))
    got = assemble(reqs, ids, weight=weight, encoders={"image": enc}, cache=cache)
    want, _ = assemble_oracle(reqs, ids, _oracle_embedding, weight=weight)
    assert torch.equal(got, want)
    assert len(enc.calls) == 1
    assert sorted(enc.calls[0]) == [10, 11] + list(range(100, 108))  # each key once
    # chunk 2: [46, 60): only the cut images, served from the cache with no encoder call
    reqs2 = eight_requests(46, 14)
    ids2 = torch.randint(0, 50, (8 * 14,))
    got2 = assemble(reqs2, ids2, weight=weight, encoders={"image": enc}, cache=cache)
    want2, _ = assemble_oracle(reqs2, ids2, _oracle_embedding, weight=weight)
    assert torch.equal(got2, want2)
    assert len(enc.calls) == 1
    assert cache.stats.hits == 8


def test_items_outside_chunk_are_never_encoded():
    enc = CountingEncoder()
    reqs = [Request([image(1, 0, 4), image(2, 10, 4), image(3, 30, 4)], 8, 10)]
    assemble(reqs, torch.zeros(10, dtype=torch.long), weight=torch.zeros(3, H),
             encoders={"image": enc})
    assert enc.calls == [[2]]


def test_budgets_split_calls_without_splitting_items():
    enc = CountingEncoder()
    reqs = [Request([image(k, 20 * k, 10) for k in range(5)], 0, 100)]
    assemble(reqs, torch.zeros(100, dtype=torch.long), weight=torch.zeros(3, H),
             encoders={"image": Encoder(enc, max_items=2)})
    assert enc.calls == [[0, 1], [2, 3], [4]]
    enc2 = CountingEncoder()
    assemble(reqs, torch.zeros(100, dtype=torch.long), weight=torch.zeros(3, H),
             encoders={"image": Encoder(enc2, max_rows=25)})
    assert enc2.calls == [[0, 1], [2, 3], [4]]


def test_mixed_sources_and_two_modalities_in_one_batch():
    img, aud = CountingEncoder(), CountingEncoder()
    cache = EmbeddingCache(1 << 24)
    cache.put(cache_key(img, 50), image_embedding(50, 6))  # cached image
    pre = Item(60, [(30, 33)], embedding=torch.randn(4, H).half())  # precomputed, fp16
    audio = Item(70, [(40, 44)], modality="audio", data={"rows": 5})
    reqs = [Request([image(50, 2, 6), image(51, 12, 3), pre, audio], 0, 50),
            Request([image(51, 0, 3), Item(71, [(5, 6)], modality="audio", data={"rows": 2})], 0, 8)]
    ids = torch.randint(0, 9, (58,))
    weight = torch.randn(9, H).bfloat16()
    got = assemble(reqs, ids, weight=weight, encoders={"image": img, "audio": aud}, cache=cache)
    want, _ = assemble_oracle(reqs, ids, _oracle_embedding, weight=weight)
    assert torch.equal(got, want)
    assert img.calls == [[51]] and aud.calls == [[70, 71]]


def test_collided_cache_entry_is_dropped_and_reencoded():
    enc = CountingEncoder()
    cache = EmbeddingCache(1 << 20)
    cache.put(cache_key(enc, 5), torch.zeros(3, H))  # wrong row count for the item with key 5
    reqs = [Request([image(5, 0, 6)], 0, 6)]
    out = assemble(reqs, torch.zeros(6, dtype=torch.long), weight=torch.zeros(2, H),
                   encoders={"image": enc}, cache=cache)
    assert enc.calls == [[5]] and cache.stats.collisions == 1
    assert torch.equal(out, image_embedding(5, 6))
    assert cache.peek(cache_key(enc, 5)).shape[0] == 6


def test_oversized_embedding_is_used_but_not_cached():
    enc = CountingEncoder()
    cache = EmbeddingCache(64)
    out = assemble([Request([image(9, 0, 8)], 0, 8)], torch.zeros(8, dtype=torch.long),
                   weight=torch.zeros(2, H), encoders={"image": enc}, cache=cache)
    assert torch.equal(out, image_embedding(9, 8)) and cache_key(enc, 9) not in cache and not len(cache)


def test_encoder_output_in_another_dtype_is_converted_once_in_the_kernel():
    enc = CountingEncoder()
    cache = EmbeddingCache(1 << 20)
    weight = torch.zeros(2, H).bfloat16()
    out = assemble([Request([image(3, 0, 4)], 0, 4)], torch.zeros(4, dtype=torch.long),
                   weight=weight, encoders={"image": enc}, cache=cache)
    assert cache.peek(cache_key(enc, 3)).dtype == torch.float32  # cached as returned
    assert torch.equal(out, image_embedding(3, 4).bfloat16())


def test_deepstack_from_encoder():
    enc = CountingEncoder(width=3 * H)
    ds = torch.zeros(10, 2 * H)
    reqs = [Request([image(4, 2, 5)], 0, 10)]
    ids = torch.randint(0, 3, (10,))
    weight = torch.randn(3, H)
    out = assemble(reqs, ids, weight=weight, deepstack_out=ds, encoders={"image": enc})
    emb = image_embedding(4, 5, 3 * H)
    assert torch.equal(out[2:7], emb[:, :H]) and torch.equal(ds[2:7], emb[:, H:])
    assert torch.equal(ds[:2], torch.zeros(2, 2 * H)) and torch.equal(out[7:], weight[ids[7:]])


def test_reached_counts():
    """Every item a window reaches gets a source (24 slots); each distinct key is encoded
    once, in one call (10 keys: two shared by every request, one of each's own)."""
    enc = CountingEncoder()
    asm = Assembler(weight=torch.randn(50, H), max_tokens=8 * 46, max_requests=8, encoders={"image": enc},
                    backend="torch")
    reqs = eight_requests(0, 46)
    handles = asm.add_requests([(r.items, None) for r in reqs])
    asm.assemble(handles, [0] * 8, [46] * 8, torch.randint(0, 50, (8 * 46,)))
    stats = asm.stats()
    assert stats["first_contacts"] == 24 and stats["encoder_calls"] == 1 and len(enc.calls) == 1
    assert sorted(enc.calls[0]) == sorted([10, 11] + list(range(100, 108)))
    assert stats["encoded_rows"] == 10 * 12 and stats["held_sources"] == 24
