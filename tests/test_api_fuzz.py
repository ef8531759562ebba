"""Fuzz of the public API with outputs as views inside sentinel-filled buffers: rows
outside the batch stay untouched and no input is modified, on every entry point
(device ops, stateless ``assemble`` in both modes, vLLM merge), or a typed error leaves
everything as it was."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import mmkernels
from kernel_utils import assert_bitwise_equal
from mmassembler import AssemblyError, assemble, assemble_oracle
from mmassembler.engines import merge_multimodal_embeddings
from strategies import batches, segment_tables

SENTINEL = 123.0


def _padded(rows, cols, dtype, device, pad=3):
    big = torch.full((rows + 2 * pad, cols + 5), SENTINEL, dtype=dtype, device=device)
    return big, big[pad:pad + rows, 2:2 + cols]  # a view with row stride > cols and an offset


def _snapshot(*tensors):
    return [t.clone() for t in tensors if isinstance(t, torch.Tensor)]


def _unchanged(before, *tensors):
    return all(torch.equal(a, b) for a, b in zip(before, [t for t in tensors if isinstance(t, torch.Tensor)]))


@given(batch=batches(max_requests=5, max_items=3), fused=st.booleans(), backend=st.sampled_from(["torch", "triton"]),
       corrupt=st.sampled_from([None, "ids", "rows"]))
def test_assemble_writes_only_its_rows_and_reads_only(device, batch, fused, backend, corrupt):
    n, hidden = batch.num_tokens, batch.hidden
    weight = torch.randn(batch.vocab, hidden).to(batch.out_dtype).to(device)
    ids = batch.input_ids.to(device)
    items = [it for r in batch.requests for it in r.items]
    for it in items:  # the strategy builds on the CPU: move, keeping each row stride
        emb = it.embedding
        base = emb if emb._base is None else emb._base
        it.__dict__["embedding"] = base.to(device)[:, :emb.shape[1]]
    if corrupt == "ids":
        ids = torch.zeros(n + 1, dtype=torch.long, device=device)
    elif corrupt == "rows" and items:
        items[0].__dict__["embedding"] = items[0].embedding[:-1] if items[0].embedding.shape[0] else None
    big, out = _padded(n, hidden, batch.out_dtype, device)
    base = torch.randn(n, hidden).to(batch.out_dtype).to(device)
    out.copy_(base)
    before_big = big.clone()
    inputs = _snapshot(weight, ids, *[it.embedding for it in items])
    try:
        got = assemble(batch.requests, ids, weight=weight if fused else None, out=None if fused else out,
                       backend=backend)
    except AssemblyError:
        assert corrupt is not None and torch.equal(big, before_big)
        assert _unchanged(inputs, weight, ids, *[it.embedding for it in items])
        return
    want, _ = assemble_oracle(batch.requests, ids.cpu(), lambda it: it.embedding.cpu(),
                              weight=weight.cpu() if fused else None, out=None if fused else base.cpu())
    assert_bitwise_equal(got, want.to(batch.out_dtype))
    if fused:
        assert torch.equal(big, before_big)  # the result is a new tensor: the buffer is untouched
    else:
        mask = torch.ones_like(big, dtype=torch.bool)
        mask[3:3 + n, 2:2 + hidden] = False
        assert torch.equal(big[mask], before_big[mask])
    assert _unchanged(inputs, weight, ids, *[it.embedding for it in items])


@given(table=segment_tables(max_hidden=64), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_device_ops_and_vllm_merge_write_only_their_rows(device, table, dtype, seed):
    from kernel_utils import make_sources

    num_out, hidden, _, specs, segments = table
    gen = torch.Generator().manual_seed(seed)
    sources = make_sources(specs, device, gen)
    inputs = _snapshot(*sources)
    big, out = _padded(num_out, hidden, dtype, device)
    before = big.clone()
    mmkernels.gather_rows(out, sources, segments, backend="triton")
    ref = before[3:3 + num_out, 2:2 + hidden].clone()
    mmkernels.gather_rows_ref(ref, sources, mmkernels.check_segments(segments, sources, num_out))
    assert_bitwise_equal(out, ref)
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[3:3 + num_out, 2:2 + hidden] = False
    assert torch.equal(big[mask], before[mask]) and _unchanged(inputs, *sources)
    # vLLM's merge: placeholder rows of a mask take the concatenated parts, in order
    parts = [s[:2] for s in sources]
    is_mm = torch.zeros(num_out, dtype=torch.bool, device=device)
    k = sum(p.shape[0] for p in parts)
    is_mm[torch.randperm(num_out, generator=gen)[:k].sort().values.to(device)] = True
    big2, out2 = _padded(num_out, hidden, dtype, device)
    before2 = big2.clone()
    try:
        merge_multimodal_embeddings(out2, parts, is_mm)
    except AssemblyError:
        assert k > num_out and torch.equal(big2, before2)
        return
    want = before2[3:3 + num_out, 2:2 + hidden].clone()
    want[is_mm] = torch.cat(parts).to(dtype)
    assert_bitwise_equal(out2, want)
    assert torch.equal(big2[mask], before2[mask])
