"""What the library shows of itself: cache and Assembler stats on a known schedule, a
one-line repr, a readable dump of a step, DEBUG logs only when asked for."""

import logging

import torch

from mmassembler import Assembler, EmbeddingCache, Item, cache_key

H = 4


def _setup():
    enc_calls = []

    def encoder(items):
        enc_calls.append(len(items))
        return [torch.full((3, H), float(it.key)) for it in items]

    cache = EmbeddingCache(1 << 20)
    asm = Assembler(weight=torch.zeros(5, H), max_tokens=32, max_requests=4, max_items=16,
                    encoders={"image": encoder}, cache=cache)
    return asm, cache, encoder, enc_calls


def test_stats_count_a_known_schedule():
    asm, cache, encoder, enc_calls = _setup()
    a = asm.add_request([Item(1, [(1, 3)]), Item(2, [(5, 7)])], 10)
    b = asm.add_request([Item(1, [(2, 4)])], 8)  # the same key as a's first item
    ids = torch.zeros(18, dtype=torch.long)
    asm.assemble([a, b], [0, 0], [10, 8], ids)  # 3 items reached, 2 distinct keys: 1 call, 2 misses
    s = asm.stats()
    assert (s["first_contacts"], s["encoder_calls"], s["encoded_rows"]) == (3, 1, 6)
    assert (s["cache_hits"], s["cache_misses"], s["live_requests"], s["live_items"]) == (0, 2, 2, 3)
    assert s["cache"]["misses"] == 2 and s["cache"]["entries"] == 2
    assert s["cache"]["bytes"] == cache.bytes == 2 * 3 * H * 4  # one block of both keys' rows
    asm.remove_request(b)
    c = asm.add_request([Item(2, [(0, 2)])], 4)  # key 2 is cached now
    asm.assemble([c], [0], [4], ids[:4])
    s = asm.stats()
    assert (s["cache_hits"], s["encoder_calls"], s["live_requests"], s["removed"]) == (1, 1, 2, 1)
    assert cache.stats.hits == 1 and cache_key(encoder, 2) in cache
    assert len(asm) == 2 and s["held_sources"] == 3 and s["held_bytes"] > 0


def test_repr_and_dump_step():
    asm, _, _, _ = _setup()
    h = asm.add_request([Item(9, [(1, 3)])], 10)
    asm.assemble([h], [0], [2], torch.zeros(2, dtype=torch.long))
    line = repr(asm)
    assert "\n" not in line and "Assembler(fused" in line and "1/4 requests" in line
    dump = asm.dump_step([h], [2], [8])
    assert "window [2, 10)" in dump and "item 9" in dump and "source float32" in dump


def test_debug_logs_each_step_only_when_asked(caplog):
    asm, _, _, _ = _setup()
    h = asm.add_request([], 4)
    with caplog.at_level(logging.INFO, logger="mmassembler"):
        asm.assemble([h], [0], [4], torch.zeros(4, dtype=torch.long))
    assert not [r for r in caplog.records if "step" in r.getMessage()]
    with caplog.at_level(logging.DEBUG, logger="mmassembler"):
        asm.assemble([h], [0], [4], torch.zeros(4, dtype=torch.long))
    assert any("1 requests, 4 tokens" in r.getMessage() for r in caplog.records)
