"""Inputs at the edge of what is valid (subnormals, empty windows, huge windows, mixed
dtypes, repeated keys): each gives the right rows, or a typed error before any write, on
both paths (stateless ``assemble`` and the ``Assembler``)."""

import pytest
import torch

import mmkernels
from mmassembler import (cache_key, Assembler, AssemblyError, BatchShapeError, CapacityError, EmbeddingCache,
                         Item, Request, RowCountError, assemble)

H = 8


def _strided_ids(n, vocab, device, kind):
    ids = torch.randint(0, vocab, (n, 3), device=device)
    if kind == "column":
        return ids[:, 1]  # stride 3
    return ids[:1, 0].expand(n)  # stride 0: every row the same id


@pytest.mark.parametrize("kind", ["column", "expanded"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_input_ids_are_read_with_their_stride(device, kind, backend):
    weight = torch.randn(20, H, device=device)
    emb = torch.randn(3, H, device=device)
    ids = _strided_ids(9, 20, device, kind)
    want = weight[ids.contiguous()].clone()
    want[2:5] = emb
    got = mmkernels.embed_and_gather(ids, weight, [emb], [(0, 0, 2, 3)], backend=backend)
    assert torch.equal(got, want)
    item = Item(1, [(2, 4)], embedding=emb)
    assert torch.equal(assemble([Request([item], 0, 9)], ids, weight=weight, backend=backend), want)
    asm = Assembler(weight=weight, max_tokens=16, max_requests=2, backend=backend)
    h = asm.add_request([item], prompt_len=9)
    assert torch.equal(asm.assemble([h], [0], [9], ids), want)


def test_overlapping_out_rows_are_rejected_before_writing(device):
    base = torch.zeros(H + 4, device=device)
    out = base.as_strided((5, H), (1, 1))  # rows overlap
    emb = torch.randn(2, H, device=device)
    with pytest.raises(ValueError, match="overlap"):
        mmkernels.gather_rows(out, [emb], [(0, 0, 1, 2)])
    with pytest.raises(BatchShapeError):
        assemble([Request([Item(1, [(1, 2)], embedding=emb)], 0, 5)], None, out=out)
    asm = Assembler(hidden=H, dtype=torch.float32, device=device, max_tokens=8, max_requests=1)
    h = asm.add_request([Item(1, [(1, 2)], embedding=emb)])
    with pytest.raises(BatchShapeError):
        asm.assemble([h], [0], [5], out=out)
    assert torch.equal(base, torch.zeros_like(base))


@pytest.mark.parametrize("block_rows", [-1, 0, 3, 256, 2.0, True])
def test_bad_block_rows_is_a_typed_error(device, block_rows):
    weight = torch.randn(5, H, device=device)
    ids = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="block_rows"):
        mmkernels.embed_and_gather(ids, weight, [], [], backend="triton", block_rows=block_rows)
    with pytest.raises(BatchShapeError, match="block_rows"):
        assemble([Request([], 0, 4)], ids, weight=weight, block_rows=block_rows)
    with pytest.raises(BatchShapeError, match="block_rows"):
        Assembler(weight=weight, max_tokens=8, max_requests=1, block_rows=block_rows)


@pytest.mark.parametrize("path", ["stateless", "assembler"])
def test_encoder_outputs_that_require_grad_are_detached(device, path):
    weight = torch.randn(5, H, device=device)
    grad_src = torch.randn(3, H, device=device, requires_grad=True)
    enc = {"image": lambda items: [grad_src * 2 for _ in items]}
    cache = EmbeddingCache(1 << 20)
    item = Item(7, [(1, 3)])
    ids = torch.zeros(5, dtype=torch.long, device=device)
    if path == "stateless":
        got = assemble([Request([item], 0, 5)], ids, weight=weight, encoders=enc, cache=cache,
                       backend="torch")
    else:
        asm = Assembler(weight=weight, max_tokens=8, max_requests=1, encoders=enc, cache=cache,
                        backend="torch")
        got = asm.assemble([asm.add_request([item])], [0], [5], ids)
    assert not got.requires_grad and got.grad_fn is None
    kept = cache.peek(cache_key(enc["image"], 7))
    assert not kept.requires_grad and kept.grad_fn is None
    assert torch.equal(got[1:4], (grad_src * 2).detach())


@pytest.mark.parametrize("hit_first", [True, False])
@pytest.mark.parametrize("path", ["stateless", "assembler"])
def test_one_key_with_two_row_counts_fails_in_either_order(device, hit_first, path):
    weight = torch.randn(5, H, device=device)
    cache = EmbeddingCache(1 << 20)
    enc = {"image": lambda items: [torch.randn(len(range(*it.data)), H, device=device) for it in items]}
    cache.put(cache_key(enc["image"], 9), torch.randn(3, H, device=device))  # fits the 3-row item
    three, four = Item(9, [(0, 2)], data=(0, 3)), Item(9, [(0, 3)], data=(0, 4))
    first, second = (three, four) if hit_first else (four, three)
    ids = torch.zeros(8, dtype=torch.long, device=device)
    before = dict(cache._entries), cache.stats.hits, cache.stats.misses
    with pytest.raises(RowCountError) as info:
        if path == "stateless":
            assemble([Request([first], 0, 4), Request([second], 0, 4)], ids, weight=weight,
                     encoders=enc, cache=cache)
        else:
            asm = Assembler(weight=weight, max_tokens=8, max_requests=2, encoders=enc, cache=cache)
            hs = [asm.add_request([first]), asm.add_request([second])]
            asm.assemble(hs, [0, 0], [4, 4], ids)
    assert isinstance(info.value, AssemblyError) and info.value.item_key == 9
    assert "3 rows" in str(info.value) and "4 rows" in str(info.value)
    assert (dict(cache._entries), cache.stats.hits, cache.stats.misses) == before


def test_bad_backend_and_capacity_fail_before_the_cache_changes(device, monkeypatch):
    """every check before the first cache write or encoder call."""
    weight = torch.randn(5, H, device=device)
    cache = EmbeddingCache(1 << 20)
    calls = []
    enc = {"image": lambda items: calls.append(len(items)) or [torch.ones(3, H, device=device)
                                                                for _ in items]}
    req = [Request([Item(3, [(1, 3)])], 0, 5)]
    ids = torch.zeros(5, dtype=torch.long, device=device)
    with pytest.raises(BatchShapeError, match="backend"):
        assemble(req, ids, weight=weight, encoders=enc, cache=cache, backend="trtion")
    monkeypatch.setenv("MMKERNELS_BACKEND", "cuda-fast")
    with pytest.raises(BatchShapeError, match="MMKERNELS_BACKEND"):
        assemble(req, ids, weight=weight, encoders=enc, cache=cache)
    monkeypatch.delenv("MMKERNELS_BACKEND")
    asm = Assembler(weight=weight, max_tokens=4, max_requests=1, encoders=enc, cache=cache)
    h = asm.add_request(req[0].items)
    with pytest.raises(CapacityError, match="max_tokens"):
        asm.assemble([h], [0], [5], ids)
    assert calls == [] and len(cache) == 0 and (cache.stats.hits, cache.stats.misses) == (0, 0)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_bf16_sources_convert_exactly_subnormals_included(device, out_dtype):
    """the interpreter's own bf16 cast mangles subnormals; both kernels
    convert every bf16 bit pattern as torch does."""
    from kernel_utils import assert_bitwise_equal

    bits = torch.randint(-(1 << 15), 1 << 15, (64, H), dtype=torch.int32).to(torch.int16)
    bits[:8] = torch.randint(-127, 128, (8, H), dtype=torch.int16)  # subnormals and zeros
    src = bits.view(torch.bfloat16).to(device)
    src = torch.where(torch.isnan(src), torch.zeros_like(src), src)  # NaN payloads: torch-defined
    want = src.to(out_dtype)
    out = torch.zeros(64, H, dtype=out_dtype, device=device)
    mmkernels.gather_rows(out, [src], [(0, 0, 0, 64)], backend="triton")
    assert_bitwise_equal(out, want, "segment kernel")
    asm = Assembler(hidden=H, dtype=out_dtype, device=device, max_tokens=64, max_requests=1,
                    backend="triton")
    h = asm.add_request([Item(1, [(0, 63)], embedding=src)])
    got = asm.assemble([h], [0], [64], out=torch.zeros(64, H, dtype=out_dtype, device=device))
    assert_bitwise_equal(got, want, "step kernel")


@pytest.mark.parametrize("path", ["stateless", "assembler"])
def test_a_failed_copy_of_an_encoder_output_is_typed_and_caches_nothing(device, path):
    """converting an encoder output to the output device happens before
    any cache write; a failure is an EmbeddingFormatError naming the item."""
    from mmassembler import EmbeddingFormatError

    weight = torch.randn(5, H, device=device)
    cache = EmbeddingCache(1 << 20)
    enc = {"image": lambda items: [torch.empty(it.data, H, device="meta") for it in items]}
    cache.put(cache_key(enc["image"], 1), torch.ones(2, H, device=device))
    items = [Item(1, [(0, 1)]), Item(2, [(3, 5)], data=3)]  # a hit, then a failed copy
    ids = torch.zeros(6, dtype=torch.long, device=device)
    before = dict(cache._entries), cache.stats.hits, cache.stats.misses
    with pytest.raises(EmbeddingFormatError) as info:
        if path == "stateless":
            assemble([Request(items, 0, 6)], ids, weight=weight, encoders=enc, cache=cache)
        else:
            asm = Assembler(weight=weight, max_tokens=8, max_requests=1, encoders=enc, cache=cache)
            asm.assemble([asm.add_request(items)], [0], [6], ids)
    assert info.value.item_key == 2 and info.value.request == 0
    assert (dict(cache._entries), cache.stats.hits, cache.stats.misses) == before
