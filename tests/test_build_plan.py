"""The kernel metadata: the plain-Python (small) and numpy builders give the same table."""

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_utils import make_sources
from strategies import segment_tables

from mmkernels import prepare_segments
from mmkernels.ops import build_plan


@given(table=segment_tables(), fused=st.booleans(), block_rows=st.sampled_from([1, 4, 16, 64]),
       seed=st.integers(0, 2**31 - 1))
def test_python_and_numpy_builders_agree(table, fused, block_rows, seed):
    num_out, hidden, _, specs, segments = table
    sources = make_sources(specs, "cpu", torch.Generator().manual_seed(seed))
    segs = prepare_segments(segments, sources, num_out)
    n_rows = num_out if fused else None
    small = build_plan(segs, sources, block_rows, hidden, n_rows, small=10**9)
    large = build_plan(segs, sources, block_rows, hidden, n_rows, small=-1)
    assert np.array_equal(small.meta, large.meta)
    assert (small.num_segments, small.num_tiles, small.aligned, small.kinds) == (
        large.num_segments, large.num_tiles, large.aligned, large.kinds)
    # tiles cover exactly the rows the mode writes
    covered = num_out if fused else sum(s[3] for s in segments)
    assert int(small.meta[2, :small.num_segments].sum()) == covered
