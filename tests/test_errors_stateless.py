"""Bad input: one typed error per kind, naming request and item, raised before any write."""

import pytest
import torch

from mmassembler import (cache_key, AssemblyError, BatchShapeError, ChunkWindowError, EmbeddingCache,
                         EmbeddingFormatError, EmbedMaskError, EncoderOutputError, Item,
                         MissingEncoderError, Request, RowCountError, SpanError, assemble)

H = 8


def good_request():
    return Request([Item(100, [(2, 4)], embedding=torch.ones(3, H))], 0, 10, prompt_len=10)


def _item(**kw):
    base = dict(key=7, spans=[(1, 3)], embedding=torch.ones(3, H))
    base.update(kw)
    return Item(**base)


# (name, bad request at index 1, expected error type, expected request, expected item key)
CASES = [
    ("spans out of order", Request([_item(spans=[(5, 6), (1, 2)], embedding=torch.ones(4, H))], 0, 8),
     SpanError, 1, 7),
    ("spans overlapping", Request([_item(spans=[(1, 4), (4, 6)], embedding=torch.ones(7, H))], 0, 8),
     SpanError, 1, 7),
    ("negative span", Request([_item(spans=[(-1, 1)])], 0, 8), SpanError, 1, 7),
    ("span end before start", Request([_item(spans=[(3, 1)])], 0, 8), SpanError, 1, 7),
    ("span past the prompt", Request([_item(spans=[(6, 8)])], 0, 7, prompt_len=7), SpanError, 1, 7),
    ("items share a position", Request([_item(), _item(key=8, spans=[(3, 5)])], 0, 8),
     SpanError, 1, 8),
    ("embed_mask length", Request([_item(embed_mask=[True, False])], 0, 8), EmbedMaskError, 1, 7),
    ("negative prefix", Request([_item()], -1, 8), ChunkWindowError, 1, None),
    ("negative extend", Request([_item()], 0, -2), ChunkWindowError, 1, None),
    ("window past the prompt", Request([_item()], 4, 8, prompt_len=10), ChunkWindowError, 1, None),
    ("precomputed rows", Request([_item(embedding=torch.ones(2, H))], 0, 8), RowCountError, 1, 7),
    ("hidden size", Request([_item(embedding=torch.ones(3, H + 1))], 0, 8),
     EmbeddingFormatError, 1, 7),
    ("dtype kind", Request([_item(embedding=torch.ones(3, H, dtype=torch.int32))], 0, 8),
     EmbeddingFormatError, 1, 7),
    ("device", Request([_item(embedding=torch.ones(3, H, device="meta"))], 0, 8),
     EmbeddingFormatError, 1, 7),
    ("missing encoder", Request([_item(embedding=None, modality="audio")], 0, 8),
     MissingEncoderError, 1, 7),
]


@pytest.mark.parametrize("mode", ["scatter", "fused"])
@pytest.mark.parametrize("name,bad,err,req,key", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_typed_error_and_writes_nothing(name, bad, err, req, key, mode):
    requests = [good_request(), bad]
    n = sum(max(r.extend_len, 0) for r in requests)
    out = torch.full((n, H), 123.0)
    before = out.clone()
    ids = torch.zeros(n, dtype=torch.long)
    with pytest.raises(err) as info:
        if mode == "scatter":
            assemble(requests, ids, out=out)
        else:
            assemble(requests, ids, weight=torch.zeros(5, H))
    e = info.value
    assert isinstance(e, AssemblyError)
    assert e.request == req and e.item_key == key
    assert f"request {req}" in str(e)
    if key is not None:
        assert f"item {key}" in str(e)
    assert torch.equal(out, before)


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight=torch.zeros(5, H), out=torch.zeros(10, H)), "exactly one"),
    (dict(), "exactly one"),
    (dict(out=torch.zeros(9, H)), r"shape \[9, 8\], expected \[10, \*\]"),
    (dict(weight=torch.zeros(0, H)), "vocab >= 1"),
])
def test_bad_buffers(kwargs, match):
    with pytest.raises(BatchShapeError, match=match):
        assemble([good_request()], torch.zeros(10, dtype=torch.long), **kwargs)


def test_input_ids_length_must_match_extend_lengths():
    out = torch.full((10, H), 1.0)
    with pytest.raises(BatchShapeError, match="input_ids has 9 tokens .* add up to 10"):
        assemble([good_request()], torch.zeros(9, dtype=torch.long), out=out)
    assert torch.equal(out, torch.full((10, H), 1.0))


def _encoder_returning(fn):
    calls = []

    def enc(items):
        calls.append([it.key for it in items])
        return fn(items)
    enc.calls = calls
    return enc


ENCODER_CASES = {
    "too few rows": lambda items: [torch.ones(it.num_rows - (it.key == 2), H) for it in items],
    "too many rows": lambda items: [torch.ones(it.num_rows + (it.key == 2), H) for it in items],
    "one tensor too few": lambda items: [torch.ones(it.num_rows, H) for it in items][:-1],
    "rows_per_item disagrees": lambda items: (torch.ones(sum(it.num_rows for it in items), H),
                                              [it.num_rows + 1 if it.key == 2 else it.num_rows
                                               for it in items]),
    "shifted concatenation": lambda items: (torch.ones(sum(it.num_rows for it in items), H),
                                            [it.num_rows + (1 if it.key == 1 else -1 if it.key == 2
                                                            else 0) for it in items]),
    "not a list": lambda items: torch.ones(3, H),
}


@pytest.mark.parametrize("name", list(ENCODER_CASES))
def test_encoder_row_mismatch_writes_and_caches_nothing(name):
    cache = EmbeddingCache(1 << 20)
    enc = _encoder_returning(ENCODER_CASES[name])
    cache.put(cache_key(enc, 99), torch.zeros(4, H))
    requests = [Request([Item(99, [(0, 3)])], 0, 6),
                Request([Item(1, [(0, 2)]), Item(2, [(4, 7)])], 0, 10)]
    out = torch.full((16, H), 5.0)
    stats_before = vars(cache.stats).copy()
    with pytest.raises(RowCountError) as info:
        assemble(requests, None, out=out, encoders={"image": enc}, cache=cache)
    assert len(enc.calls) == 1
    assert info.value.item_key in (1, 2) and info.value.request == 1
    if name != "not a list":
        assert info.value.expected is not None and info.value.returned is not None
    assert torch.equal(out, torch.full((16, H), 5.0))
    assert len(cache) == 1 and cache_key(enc, 1) not in cache and cache_key(enc, 2) not in cache
    assert vars(cache.stats) == stats_before


def test_encoder_output_error_is_a_row_count_error():
    assert issubclass(EncoderOutputError, RowCountError)
