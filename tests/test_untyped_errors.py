"""Inputs that used to raise untyped errors (TypeError, IndexError, plain ValueError) or be
accepted: each is an ``AssemblyError`` subclass naming the request/item where there is
one (issue 10, item 12)."""

import logging
from types import SimpleNamespace

import pytest
import torch

from mmassembler import (cache_key, AssemblyError, BatchShapeError, ChunkWindowError, EmbedMaskError,
                         EmbeddingCache, EmbeddingFormatError, Encoder, EncoderOutputError, Item,
                         Request, SpanError, assemble)
from mmassembler.engines import embed_input_ids, embed_mm_inputs, merge_multimodal_embeddings

H = 4
W = torch.randn(10, H)


def _run(items, encoder=None, requests=None, prompt_len=None):
    reqs = requests if requests is not None else [Request(items, 0, 6, prompt_len)]
    n = sum(r.extend_len for r in reqs if isinstance(r, Request))
    return assemble(reqs, torch.zeros(n, dtype=torch.long), weight=W,
                    encoders={"image": encoder} if encoder else None)


CASES = {
    "encoder (tensor, None)": (lambda: _run([Item(1, [(0, 2)])], lambda items: (torch.ones(3, H), None)),
                               EncoderOutputError, 0, 1),
    "encoder 2-D rows_per_item": (lambda: _run([Item(1, [(0, 2)])],
                                               lambda items: (torch.ones(3, H), torch.tensor([[3]]))),
                                  EncoderOutputError, 0, 1),
    "encoder string rows_per_item": (lambda: _run([Item(1, [(0, 2)])], lambda items: (torch.ones(3, H), "3")),
                                     EncoderOutputError, 0, 1),
    "non-Item in items": (lambda: _run([(1, [(0, 2)])]), SpanError, 0, None),
    "unhashable key": (lambda: _run([Item([1], [(0, 2)], embedding=torch.ones(3, H))]), SpanError, 0, None),
    "span past 2**63": (lambda: _run([Item(1, [(0, 2**63)])]), SpanError, 0, 1),
    "meta embed_mask": (lambda: _run([Item(1, [(0, 2)], embedding=torch.ones(3, H),
                                           embed_mask=torch.ones(3, dtype=torch.bool, device="meta"))]),
                        EmbedMaskError, 0, 1),
    "float prompt_len": (lambda: _run([], prompt_len=7.5), ChunkWindowError, 0, None),
    "non-Request in requests": (lambda: _run([], requests=[Request([], 0, 1), "req"]), BatchShapeError, 1, None),
    "Encoder(max_items=0)": (lambda: Encoder(lambda items: [], max_items=0), BatchShapeError, None, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_typed_errors(name):
    call, err, request, key = CASES[name]
    with pytest.raises(err) as info:
        call()
    assert isinstance(info.value, AssemblyError)
    assert info.value.request == request and info.value.item_key == key


def _sg_batch(rows_fn):
    modality = SimpleNamespace(name="IMAGE")
    items = [SimpleNamespace(modality=modality, hash=k, offsets=[(2 * k, 2 * k + 1)],
                             precomputed_embeddings=None, feature=None) for k in (1, 2)]
    mm = SimpleNamespace(mm_items=items)
    return dict(mm_inputs_list=[mm], extend_prefix_lens=[0], extend_seq_lens=[6],
                input_ids=torch.zeros(6, dtype=torch.long), input_embedding=torch.nn.Embedding(10, H),
                data_embedding_func_mapping={"image": lambda its: torch.ones(2 * len(its), H)},
                rows_fn=rows_fn)


def test_sglang_rows_fn_returning_none_is_typed():
    with pytest.raises(EncoderOutputError) as info:
        embed_mm_inputs(**_sg_batch(lambda item: None))
    assert info.value.item_key == 1


@pytest.mark.parametrize("bad", ["hidden", "dtype", "device"])
def test_vllm_merge_with_wrong_embeddings_is_typed(bad):
    embeds = torch.zeros(6, H)
    mm = {"hidden": torch.ones(2, H + 1), "dtype": torch.ones(2, H, dtype=torch.int32),
          "device": torch.ones(2, H, device="meta")}[bad]
    mask = torch.tensor([0, 1, 1, 0, 0, 0], dtype=torch.bool)
    with pytest.raises(EmbeddingFormatError):
        merge_multimodal_embeddings(embeds, [mm], mask)
    with pytest.raises(EmbeddingFormatError):
        embed_input_ids(torch.zeros(6, dtype=torch.long), [mm], is_multimodal=mask, embed_tokens=W)
    assert torch.equal(embeds, torch.zeros(6, H))


@pytest.mark.parametrize("mask", [torch.zeros(8, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)],
                         ids=["longer", "2-D"])
def test_vllm_is_multimodal_shape_is_checked(mask):
    mask = mask.clone()
    mask.view(-1)[:2] = True
    with pytest.raises(BatchShapeError):
        embed_input_ids(torch.zeros(6, dtype=torch.long), [torch.ones(2, H)], is_multimodal=mask,
                        embed_tokens=W)
    with pytest.raises(BatchShapeError):
        merge_multimodal_embeddings(torch.zeros(6, H), [torch.ones(2, H)], mask)


def test_string_keys_log_collisions_cleanly(caplog, capsys):
    cache = EmbeddingCache(1 << 20)
    cache.put("img-a", torch.ones(3, H))
    with caplog.at_level(logging.WARNING):
        assert cache.get("img-a", rows=4) is None
    assert "img-a" in caplog.text and "Logging error" not in capsys.readouterr().err
