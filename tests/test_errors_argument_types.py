"""Arguments of the wrong type or shape on every entry point (lists where arrays go,
floats, tensors on the wrong device, generators): each is an ``AssemblyError`` subclass
naming the request/item where there is one, never a TypeError or IndexError."""

import logging
from types import SimpleNamespace

import pytest
import torch

from mmassembler import (AssemblyError, BatchShapeError, ChunkWindowError, EmbedMaskError,
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


def test_embed_mm_inputs_called_as_the_routine_calls_it_says_what_to_call():
    """the routine's filtered lists with the whole batch's input_ids."""
    from stand_ins import Modality, SgInputs, SgItem
    from torch import nn

    m = SgInputs([SgItem(Modality.IMAGE, 1, [(1, 3)], precomputed_embeddings=torch.ones(3, H))])
    with pytest.raises(BatchShapeError, match="general_mm_embed_routine or prepare_mm_inputs"):
        embed_mm_inputs([m], [0], [8], torch.zeros(13, dtype=torch.long), nn.Embedding(10, H))


@pytest.mark.parametrize("make", [
    lambda: __import__("mmassembler").Assembler(weight=torch.zeros(4, H), max_tokens=8, max_requests=1,
                                                backend="bogus"),
    lambda: __import__("mmassembler").Assembler(weight=torch.zeros(4, H), max_tokens=8, max_requests=1,
                                                deepstack_cols=None),
    lambda: __import__("mmassembler").Assembler(weight=torch.zeros(4, H), max_tokens=8, max_requests=1,
                                                max_items=-1),
    lambda: __import__("mmassembler").Assembler(weight=torch.zeros(4, H), max_tokens=8, max_requests=1,
                                                max_runs=2.0),
    lambda: __import__("mmassembler").Assembler(weight=torch.zeros(4, H), max_tokens=8, max_requests=1,
                                                cache={}),
    lambda: __import__("mmassembler").Encoder("x"),
    lambda: __import__("mmassembler").Assembler(weight=torch.nn.Embedding(4, H), max_tokens=8, max_requests=1),
], ids=["backend", "deepstack None", "max_items", "max_runs float", "cache dict", "Encoder str", "module"])
def test_new_surfaces_are_typed(make):
    """typed errors at construction."""
    with pytest.raises(AssemblyError):
        make()


@pytest.mark.parametrize("arg", [None, (x for x in []), "abc"], ids=["None", "generator", "str"])
def test_add_request_items_that_are_not_a_list_are_typed(arg):
    from mmassembler import Assembler

    asm = Assembler(weight=torch.zeros(4, H), max_tokens=8, max_requests=1)
    with pytest.raises(AssemblyError):
        asm.add_request(arg)
    with pytest.raises(AssemblyError):
        asm.add_requests(arg)


def test_sparse_handles_and_an_out_that_requires_grad_are_typed():
    from mmassembler import Assembler, Item, Request, assemble

    asm = Assembler(weight=torch.zeros(4, H), max_tokens=8, max_requests=2)
    h = asm.add_request([], 4)
    with pytest.raises(AssemblyError):
        asm.assemble(torch.tensor([h]).to_sparse(), [0], [4], torch.zeros(4, dtype=torch.long))
    out = torch.zeros(4, H, requires_grad=True)
    with pytest.raises(AssemblyError, match="requires grad"):
        assemble([Request([Item(1, [(0, 1)], embedding=torch.ones(2, H))], 0, 4)], None, out=out)
    assert not out.detach().any()


def test_a_full_request_table_says_remove_finished_requests():
    from mmassembler import Assembler, CapacityError

    asm = Assembler(weight=torch.zeros(4, H), max_tokens=8, max_requests=1)
    asm.add_request([], 4)
    with pytest.raises(CapacityError, match="remove finished requests"):
        asm.add_request([], 4)


def test_fragmented_slots_still_fit_a_request_the_free_total_holds():
    """freed slots anywhere are usable (registration compacts)."""
    from mmassembler import Assembler, Item

    asm = Assembler(weight=torch.zeros(4, H), max_tokens=64, max_requests=8, max_items=8, max_runs=8)
    hs = [asm.add_request([Item(i, [(0, 0)], embedding=torch.ones(1, H))], 4) for i in range(8)]
    asm.remove_requests(hs[::2])  # four free slots, none two in a row
    h = asm.add_request([Item(100 + j, [(j, j)], embedding=torch.full((1, H), float(j))) for j in range(4)], 8)
    out = asm.assemble([h] + hs[1::2], [0] * 5, [8, 4, 4, 4, 4], torch.zeros(24, dtype=torch.long))
    assert torch.equal(out[:4, 0], torch.arange(4.0))


def test_huge_stateless_windows_are_typed_before_any_launch():
    """extend lengths that would add up past 2**64 wrapped to a small count."""
    from mmassembler import ChunkWindowError, Request, assemble

    reqs = [Request([], 0, 2**63), Request([], 0, 2**63 + 4)]
    with pytest.raises(ChunkWindowError):
        assemble(reqs, torch.zeros(4, dtype=torch.long), weight=torch.zeros(4, H))
    with pytest.raises(ChunkWindowError):
        assemble([Request([], 2**62, 4)], torch.zeros(4, dtype=torch.long), weight=torch.zeros(4, H),
                 backend="triton" if __import__("mmkernels").kernels_interpreted() else "torch")
