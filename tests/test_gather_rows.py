"""Scatter mode: the Triton kernel ≡ the torch reference, bit for bit.

On CPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET);
on a GPU the same tests run compiled on CUDA.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_utils import assert_bitwise_equal, make_sources
from strategies import DTYPES, segment_tables

from mmkernels import gather_rows, gather_rows_ref, check_segments

pytestmark = pytest.mark.interpreter

BLOCK_ROWS = st.sampled_from([1, 4, 16, 64])


def _run_both(out, sources, segments, ds=None, block_rows=None):
    got_out, got_ds = out.clone(), None if ds is None else ds.clone()
    gather_rows(got_out, sources, segments, deepstack_out=got_ds, backend="triton",
                block_rows=block_rows)
    segs = check_segments(segments, sources, out.shape[0])
    gather_rows_ref(out, sources, segs, deepstack_out=ds)
    assert_bitwise_equal(got_out, out)
    if ds is not None:
        assert_bitwise_equal(got_ds, ds, "deepstack_out")


@given(table=segment_tables(), out_dtype=st.sampled_from(DTYPES), block_rows=BLOCK_ROWS,
       seed=st.integers(0, 2**31 - 1))
def test_matches_reference(device, table, out_dtype, block_rows, seed):
    num_out, hidden, _, specs, segments = table
    gen = torch.Generator().manual_seed(seed)
    sources = make_sources(specs, device, gen)
    out = torch.randn(num_out, hidden, generator=gen).to(out_dtype).to(device)  # sentinel rows
    _run_both(out, sources, segments, block_rows=block_rows)


@given(table=segment_tables(max_hidden=64, deepstack=True), out_dtype=st.sampled_from(DTYPES),
       block_rows=BLOCK_ROWS, seed=st.integers(0, 2**31 - 1))
def test_deepstack_matches_reference(device, table, out_dtype, block_rows, seed):
    num_out, hidden, ds_cols, specs, segments = table
    gen = torch.Generator().manual_seed(seed)
    sources = make_sources(specs, device, gen)
    out = torch.randn(num_out, hidden, generator=gen).to(out_dtype).to(device)
    ds = torch.randn(num_out, ds_cols, generator=gen).to(out_dtype).to(device)
    _run_both(out, sources, segments, ds, block_rows)


@given(hidden=st.sampled_from([1023, 3584, 4096, 8192]), block_rows=BLOCK_ROWS,
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_large_hidden_with_ragged_tails(device, hidden, block_rows, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    sources = make_sources([(9, hidden, dtype, True), (70, hidden, torch.float32, False)], device, gen)
    out = torch.randn(100, hidden, generator=gen).to(dtype).to(device)
    _run_both(out, sources, [(0, 2, 0, 7), (1, 1, 10, 69), (0, 8, 99, 1)], block_rows=block_rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_bit_patterns_copy_exactly(device, dtype):
    # NaN payloads, infinities, denormals and -0.0 must survive a same-dtype copy bit for bit
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    info = torch.iinfo(bits)
    src = torch.randint(info.min, info.max, (50, 37), dtype=bits).view(dtype).to(device)
    out = torch.zeros(60, 37, dtype=dtype, device=device)
    _run_both(out, [src], [(0, 0, 5, 50)], block_rows=16)


# Edge grid: empty, a single row, non-power-of-2 widths, a strided (column-slice) source.
@pytest.mark.parametrize("num_out,hidden,segments", [
    (0, 8, []),
    (1, 1, [(0, 0, 0, 1)]),
    (5, 123, [(0, 3, 1, 2)]),
    (40, 781, [(0, 0, 0, 10), (0, 10, 30, 10)]),
    (12, 16, []),
])
def test_edge_cases(device, num_out, hidden, segments):
    gen = torch.Generator().manual_seed(1)
    sources = make_sources([(20, hidden, torch.bfloat16, True)], device, gen)
    out = torch.full((num_out, hidden), 123.0, device=device).bfloat16()
    _run_both(out, sources, segments)


def test_rows_outside_segments_keep_sentinel(device):
    src = torch.ones(4, 8, device=device)
    out = torch.full((10, 8), 123.0, device=device)
    gather_rows(out, [src], [(0, 0, 3, 4)], backend="triton")
    assert torch.equal(out[3:7], torch.ones(4, 8, device=device))
    assert torch.equal(out[:3], torch.full((3, 8), 123.0, device=device))
    assert torch.equal(out[7:], torch.full((3, 8), 123.0, device=device))


@pytest.mark.parametrize("segments,match", [
    ([(1, 0, 0, 1)], "source 1 not in"),
    ([(0, 3, 0, 2)], "outside sources"),
    ([(0, 0, 9, 2)], "outside the output"),
    ([(0, 0, 0, 2), (0, 0, 1, 2)], "two segments write output row 1"),
    ([(0, 0, 0, -1)], "negative row count"),
])
def test_rejects_bad_segments_before_writing(device, segments, match):
    out = torch.full((10, 4), 5.0, device=device)
    with pytest.raises(ValueError, match=match):
        gather_rows(out, [torch.zeros(4, 4, device=device)], segments, backend="triton")
    assert torch.equal(out, torch.full((10, 4), 5.0, device=device))


def test_rejects_mismatched_sources(device):
    out = torch.zeros(4, 8, device=device)
    with pytest.raises(ValueError, match="columns"):
        gather_rows(out, [torch.zeros(2, 9, device=device)], [(0, 0, 0, 1)])
    with pytest.raises(ValueError, match="dtype"):
        gather_rows(out, [torch.zeros(2, 8, dtype=torch.float64, device=device)], [(0, 0, 0, 1)])
    with pytest.raises(ValueError, match="column stride"):
        gather_rows(out, [torch.zeros(8, 2, device=device).t()], [(0, 0, 0, 1)])
