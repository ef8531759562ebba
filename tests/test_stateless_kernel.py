"""End to end through the kernel: assemble(backend="triton") ≡ the per-position oracle.

On CPU the kernel runs under the interpreter; on a GPU everything lives on CUDA.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import batches

from mmassembler import assemble, assemble_oracle, resolve_backend

pytestmark = pytest.mark.interpreter


def _embedding(item):
    return item.embedding


@given(data=st.data(), block_rows=st.sampled_from([1, 4, 16, 64]))
def test_fused_kernel_matches_oracle(device, data, block_rows):
    batch = data.draw(batches(max_requests=6, max_items=4, device=device))
    weight = torch.randn(batch.vocab, batch.hidden).to(batch.out_dtype).to(device)
    got = assemble(batch.requests, batch.input_ids, weight=weight, backend="triton",
                   block_rows=block_rows)
    want, _ = assemble_oracle(batch.requests, batch.input_ids, _embedding, weight=weight)
    assert torch.equal(got, want)


@given(data=st.data(), block_rows=st.sampled_from([1, 4, 16, 64]))
def test_scatter_kernel_with_deepstack_matches_oracle(device, data, block_rows):
    batch = data.draw(batches(max_requests=6, max_items=4, max_hidden=64, deepstack=True,
                              device=device))
    out = torch.randn(batch.num_tokens, batch.hidden).to(batch.out_dtype).to(device)
    ds = torch.randn(batch.num_tokens, batch.ds_cols).to(batch.out_dtype).to(device)
    want, want_ds = assemble_oracle(batch.requests, batch.input_ids, _embedding, out=out,
                                    deepstack_out=ds)
    assemble(batch.requests, batch.input_ids, out=out, deepstack_out=ds, backend="triton",
             block_rows=block_rows)
    assert torch.equal(out, want) and torch.equal(ds, want_ds)


def test_auto_backend_is_reported(device):
    chosen = resolve_backend("auto", device)
    assert chosen == ("triton" if device == "cuda" else "torch")
