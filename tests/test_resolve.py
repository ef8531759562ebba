"""The resolver (``mmassembler.resolve``): a source per wanted item, precomputed, cached
or encoded (deduped by modality and key, one call per modality, split by what the encoder
returned), every check before the cache changes."""

import pytest
import torch

from mmassembler import EmbeddingCache, Encoder, MissingEncoderError, RowCountError
from mmassembler.cache import cache_key
from mmassembler.resolve import resolve
from mmkernels import anchor_addresses, source_entry

H = 4
CPU = torch.device("cpu")


def _resolve(keys, rows, embs=None, mods=None, encoders=None, cache=None):
    n = len(keys)
    return resolve(list(range(n)), keys, mods or ["image"] * n, rows, embs or [None] * n, keys,
                   encoders=encoders, cache=cache, device=CPU, widths=(H, H))


def _entry(t):
    return source_entry(t, H, anchor_addresses(CPU))


def test_precomputed_embeddings_are_read_in_place():
    e = [torch.randn(3, H), torch.randn(5, H + 2)[:, :H]]
    found = _resolve([1, 2], [3, 5], embs=e)
    for (t, row0, ent, ver), want in zip(found.sources, e):
        assert t.data_ptr() == want.data_ptr() and row0 == 0 and ver == -1 and ent == _entry(want)


def test_encoded_items_are_deduped_encoded_once_and_copied_into_one_block():
    calls = []

    def enc(objs):
        calls.append(list(objs))
        return [torch.full((2, H), float(k)) for k in objs]
    found = _resolve([7, 8, 7], [2, 2, 2], encoders={"image": enc})
    assert calls == [[8, 7]] and found.encoder_calls == 1 and found.encoded_rows == 4
    blocks = {id(s[0]) for s in found.sources}
    assert len(blocks) == 1  # one block the library owns
    for s, k in zip(found.sources, [7, 8, 7]):
        t, row0 = s[0], s[1]
        assert torch.equal(t[row0:row0 + 2], torch.full((2, H), float(k))) and s[2] == _entry(t[row0:])


def test_cache_hits_skip_the_encoder_and_misses_are_put():
    cache = EmbeddingCache(1 << 20)
    enc = lambda objs: [torch.full((2, H), float(k)) for k in objs]  # noqa: E731
    cache.put(cache_key(enc, 5), torch.ones(2, H))
    found = _resolve([5, 6], [2, 2], encoders={"image": enc}, cache=cache)
    assert (found.hits, found.misses, found.encoder_calls) == (1, 1, 1)
    assert torch.equal(found.sources[0][0], torch.ones(2, H)) and cache_key(enc, 6) in cache


def test_a_cache_entry_that_no_longer_fits_is_dropped_and_encoded_again():
    cache = EmbeddingCache(1 << 20)
    enc = lambda objs: [torch.full((3, H), 2.0) for _ in objs]  # noqa: E731
    cache.put(cache_key(enc, 5), torch.ones(2, H))  # two rows; the item takes three
    found = _resolve([5], [3], encoders={"image": enc}, cache=cache)
    assert found.hits == 0 and cache.stats.collisions == 1
    assert torch.equal(found.sources[0][0], torch.full((3, H), 2.0))


@pytest.mark.parametrize("bad", ["rows", "same key other rows", "no encoder"])
def test_errors_come_before_the_cache_changes(bad):
    cache = EmbeddingCache(1 << 20)
    enc = lambda objs: [torch.zeros(2 + (bad == "rows"), H) for _ in objs]  # noqa: E731
    keys, rows = ([1, 1], [2, 3]) if bad == "same key other rows" else ([1, 2], [2, 2])
    err = MissingEncoderError if bad == "no encoder" else RowCountError
    with pytest.raises(err):
        _resolve(keys, rows, encoders=None if bad == "no encoder" else {"image": enc}, cache=cache)
    assert len(cache) == 0 and cache.stats.hits == cache.stats.misses == 0


def test_a_stable_encoder_is_read_in_place_with_its_version_and_not_cached():
    outs = [torch.randn(2, H), torch.randn(2, H)]
    cache = EmbeddingCache(1 << 20)
    found = _resolve([1, 2], [2, 2], encoders={"image": Encoder(lambda objs: [outs[k - 1] for k in objs],
                                                                   stable=True)}, cache=cache)
    for s, t in zip(found.sources, outs):
        assert s[0] is t and s[3] == t._version
    assert len(cache) == 0
