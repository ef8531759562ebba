"""Fused mode: the Triton kernel ≡ the torch reference, bit for bit, text rows included."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_utils import assert_bitwise_equal, make_sources
from strategies import DTYPES, segment_tables

from mmkernels import embed_and_gather, embed_and_gather_ref, check_segments

pytestmark = pytest.mark.interpreter

BLOCK_ROWS = st.sampled_from([1, 4, 16, 64])


def _check(ids, weight, sources, segments, out_dtype=None, ds_cols=0, block_rows=None):
    n, hidden = ids.shape[0], weight.shape[1]
    dev = weight.device
    out = None if out_dtype is None else torch.full((n, hidden), 9.0, device=dev).to(out_dtype)
    ds = torch.full((n, ds_cols), 9.0, device=dev).to(out_dtype or weight.dtype) if ds_cols else None
    got_ds = None if ds is None else ds.clone()
    got = embed_and_gather(ids, weight, sources, segments, out=None if out is None else out.clone(),
                           deepstack_out=got_ds, backend="triton", block_rows=block_rows)
    segs = check_segments(segments, sources, n)
    want = embed_and_gather_ref(ids, weight, sources, segs, out=out, deepstack_out=ds)
    assert_bitwise_equal(got, want)
    if ds is not None:
        assert_bitwise_equal(got_ds, ds, "deepstack_out")


@given(table=segment_tables(), weight_dtype=st.sampled_from(DTYPES),
       out_dtype=st.sampled_from((None,) + DTYPES), vocab=st.integers(1, 60),
       block_rows=BLOCK_ROWS, seed=st.integers(0, 2**31 - 1))
def test_matches_reference(device, table, weight_dtype, out_dtype, vocab, block_rows, seed):
    num_out, hidden, _, specs, segments = table
    gen = torch.Generator().manual_seed(seed)
    sources = make_sources(specs, device, gen)
    weight = torch.randn(vocab, hidden, generator=gen).to(weight_dtype).to(device)
    ids = torch.randint(-5, vocab + 5, (num_out,), generator=gen).to(device)  # OOV ids clamp
    _check(ids, weight, sources, segments, out_dtype, block_rows=block_rows)


@given(table=segment_tables(max_hidden=64, deepstack=True), dtype=st.sampled_from(DTYPES),
       block_rows=BLOCK_ROWS, seed=st.integers(0, 2**31 - 1))
def test_deepstack_matches_reference(device, table, dtype, block_rows, seed):
    num_out, hidden, ds_cols, specs, segments = table
    gen = torch.Generator().manual_seed(seed)
    sources = make_sources(specs, device, gen)
    weight = torch.randn(11, hidden, generator=gen).to(dtype).to(device)
    ids = torch.randint(0, 11, (num_out,), generator=gen).to(device)
    _check(ids, weight, sources, segments, ds_cols=ds_cols, block_rows=block_rows)


@pytest.mark.parametrize("hidden", [3584, 8192])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_large_hidden(device, hidden, ids_dtype):
    gen = torch.Generator().manual_seed(3)
    sources = make_sources([(33, hidden, torch.bfloat16, True)], device, gen)
    weight = torch.randn(40, hidden, generator=gen).bfloat16().to(device)
    ids = torch.randint(0, 40, (70,), generator=gen).to(ids_dtype).to(device)
    _check(ids, weight, sources, [(0, 0, 5, 33), (0, 1, 69, 1)])


@pytest.mark.parametrize("n,segments", [(0, []), (1, []), (1, [(0, 0, 0, 1)]), (7, [(0, 2, 6, 1)])])
def test_edge_cases(device, n, segments):
    gen = torch.Generator().manual_seed(2)
    sources = make_sources([(3, 5, torch.float16, False)], device, gen)
    weight = torch.randn(4, 5, generator=gen).to(device)
    ids = torch.randint(0, 4, (n,), generator=gen).to(device)
    _check(ids, weight, sources, segments)


def test_out_of_vocab_ids_are_clamped(device):
    weight = torch.arange(12.0, device=device).reshape(4, 3)
    ids = torch.tensor([-7, 0, 3, 1000], device=device)
    got = embed_and_gather(ids, weight, [], [], backend="triton")
    assert torch.equal(got, weight[torch.tensor([0, 0, 3, 3], device=device)])
