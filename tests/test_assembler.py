"""The resident Assembler over random multi-step schedules ≡ the per-position oracle, exactly.

CPU: the torch backend and the Triton interpreter; GPU: compiled Triton and torch.
Outputs are views into sentinel-filled buffers, so a stray write outside the step shows.
"""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernel_utils import assert_bitwise_equal
from mmassembler import Assembler, EmbeddingCache, Item, Request, assemble_oracle
from mmkernels import layout as L
from mmkernels.tables import source_entry
from schedules import encoded_rows, schedules

BACKENDS = ["torch", "triton"]


def run_schedule(sched, backend: str, device: str, block_rows=None, cache_bytes=1 << 20):
    """Run every step through one Assembler and compare each with the oracle."""
    gen = torch.Generator().manual_seed(sched.seed)
    weight = (torch.randn(sched.vocab, sched.hidden, generator=gen) * 4).to(sched.dtype).to(device)
    encoded = []

    def encoder(items):
        encoded.extend(it.key for it in items)
        return [encoded_rows(it.key, sched.enc_dtype, device) for it in items]

    def embedding_of(item):
        return item.embedding if item.embedding is not None else encoded_rows(item.key, sched.enc_dtype)

    asm = Assembler(weight=weight if sched.fused else None, hidden=sched.hidden, dtype=sched.dtype,
                    device=device, max_tokens=256, max_requests=len(sched.requests),
                    encoders={"image": encoder}, cache=EmbeddingCache(cache_bytes),
                    deepstack_cols=sched.ds_cols, backend=backend, block_rows=block_rows)
    handles = {}
    requests = [([_on(it, device) for it in items], n) for items, n in sched.requests]
    for step in sched.steps:
        for r in step.remove:
            asm.remove_request(handles.pop(r))
        if len(step.add) > 1 and step.add[0] % 2:  # a step's new requests together, or one by one
            handles.update(zip(step.add, asm.add_requests([requests[r] for r in step.add])))
        for r in step.add:
            if r not in handles:
                items, prompt_len = requests[r]
                handles[r] = asm.add_request(items, prompt_len=prompt_len)
        n = sum(e for _, _, e in step.windows)
        ids = torch.randint(-3, sched.vocab + 3, (n,), generator=gen).to(device)
        big = torch.randn(n + 4, sched.hidden, generator=gen).to(sched.dtype).to(device)
        big_ds = torch.randn(n + 4, max(sched.ds_cols, 1), generator=gen).to(sched.dtype).to(device)
        before, before_ds = big.clone(), big_ds.clone()
        out, ds = big[2:2 + n], (big_ds[2:2 + n] if sched.ds_cols else None)
        got = asm.assemble([handles[r] for r, _, _ in step.windows], [p for _, p, _ in step.windows],
                           [e for _, _, e in step.windows], ids, out=None if sched.fused else out,
                           deepstack_out=ds)
        reqs = [Request(sched.requests[r][0], p, e) for r, p, e in step.windows]  # CPU copies
        want, want_ds = assemble_oracle(
            reqs, ids.cpu(), embedding_of, weight=weight.cpu() if sched.fused else None,
            out=None if sched.fused else before[2:2 + n].cpu(),
            deepstack_out=before_ds[2:2 + n].cpu() if sched.ds_cols else None)
        assert_bitwise_equal(got, want.to(sched.dtype), "output")
        if sched.ds_cols:
            assert_bitwise_equal(big_ds[2:2 + n], want_ds.to(sched.dtype), "deepstack_out")
        for buf, ref in ((big, before), (big_ds, before_ds)):  # rows outside the step untouched
            assert torch.equal(buf[:2], ref[:2]) and torch.equal(buf[2 + n:], ref[2 + n:])
        if not sched.fused:
            assert got.data_ptr() == out.data_ptr()
        if asm.backend != "torch":  # the torch twin reads the host rows; nothing goes up
            check_device_runs(asm)
    return encoded


def check_device_runs(asm: Assembler) -> None:
    """Every met request's device run rows hold exactly its items' current sources: the
    held ones at their address, the rest ``KIND_NONE`` (a released source never lingers).
    A request no window with tokens has met yet has sent no rows (the kernel never reads
    them: its windows have no rows)."""
    reg = asm.registry
    dev = asm.tables.runs.cpu().numpy()
    for rec in reg.recs:
        if rec is None or rec.fresh:
            continue
        b = rec.batch
        for k in range(rec.ra, rec.ra + rec.nruns):
            row = 0 if rec.simple else b.rrow[k]
            held = b.srcs[rec.item_of_run(k)]
            entry = L.NO_SOURCE if held is None else source_entry(held[0][held[1]:], asm.hidden,
                                                                   asm.tables.anchor_addr)
            want = L.device_runs(np.array([[b.rpos[k], b.rend[k], row, 0]]), np.array([entry]))[0]
            got = dev[rec.run0 + k - rec.ra]
            assert (got == want).all(), f"run {k} of handle {rec.handle}: {got} != {want}"


def _on(item: Item, device: str) -> Item:
    """The item with its precomputed embedding on ``device`` (row stride kept)."""
    if item.embedding is None or device == "cpu":
        return item
    emb = item.embedding
    base = emb if emb._base is None else emb._base
    return Item(item.key, item.spans, item.modality, embedding=base.to(device)[:, :emb.shape[1]],
                embed_mask=item.embed_mask)


@pytest.mark.parametrize("backend", BACKENDS)
@given(sched=schedules(), block_rows=st.sampled_from([1, 4, 16, 64]))
def test_schedules_match_oracle(device, backend, sched, block_rows):
    run_schedule(sched, backend, device, block_rows=block_rows if backend == "triton" else None)


@pytest.mark.parametrize("backend", BACKENDS)
@given(sched=schedules(deepstack=True, max_steps=3))
def test_deepstack_schedules_match_oracle(device, backend, sched):
    run_schedule(sched, backend, device)


@given(sched=schedules())
def test_each_key_is_encoded_once_while_cached_and_held(device, sched):
    """With a cache that never evicts, no key is encoded twice."""
    encoded = run_schedule(sched, "torch", device, cache_bytes=1 << 30)
    assert len(encoded) == len(set(encoded))
