"""Planner + reference path ≡ the naive per-position oracle, and planner unit cases."""

import numpy as np
import pytest
import torch
from hypothesis import given
from strategies import batches

from mmassembler import Item, Request, assemble, assemble_oracle, plan_batch


def _embedding(item):
    return item.embedding


@given(batch=batches())
def test_reference_fused_matches_oracle(batch):
    weight = torch.randn(batch.vocab, batch.hidden).to(batch.out_dtype)
    got = assemble(batch.requests, batch.input_ids, weight=weight, backend="torch")
    want, _ = assemble_oracle(batch.requests, batch.input_ids, _embedding, weight=weight)
    assert torch.equal(got, want)


@given(batch=batches())
def test_reference_scatter_matches_oracle(batch):
    out = torch.randn(batch.num_tokens, batch.hidden).to(batch.out_dtype)
    before = out.clone()
    got = assemble(batch.requests, batch.input_ids, out=out, backend="torch")
    assert got is out
    want, _ = assemble_oracle(batch.requests, batch.input_ids, _embedding, out=before)
    assert torch.equal(got, want)


@given(batch=batches(max_requests=6, deepstack=True))
def test_reference_deepstack_matches_oracle(batch):
    weight = torch.randn(batch.vocab, batch.hidden).to(batch.out_dtype)
    ds = torch.full((batch.num_tokens, batch.ds_cols), 7.0).to(batch.out_dtype)
    got = assemble(batch.requests, batch.input_ids, weight=weight, deepstack_out=ds, backend="torch")
    want, want_ds = assemble_oracle(batch.requests, batch.input_ids, _embedding, weight=weight,
                                    deepstack_out=ds)
    assert torch.equal(got, want) and torch.equal(ds, want_ds)


def test_items_outside_the_chunk_are_not_planned():
    past = Item(1, [(0, 3)])
    inside = Item(2, [(10, 12)])
    future = Item(3, [(30, 40)])
    plan = plan_batch([Request([past, inside, future], prefix_len=5, extend_len=20)])
    assert [p.item.key for p in plan.items] == [2]
    assert plan.segments.tolist() == [[0, 0, 5, 3]]


def test_chunk_cuts_through_a_multi_span_item():
    item = Item(1, [(2, 5), (9, 12)])  # rows 0-3 at 2-5, rows 4-7 at 9-12
    plan = plan_batch([Request([item], prefix_len=4, extend_len=7)])  # positions 4..10
    assert plan.segments.tolist() == [[0, 2, 0, 2], [0, 4, 5, 2]]


def test_masked_positions_split_runs_and_skip_rows():
    item = Item(1, [(0, 5)], embed_mask=[True, False, True, True, False, True])
    lay = item.layout()
    assert lay.num_rows == 4
    assert lay.runs.tolist() == [[0, 1, 0], [2, 4, 1], [5, 6, 3]]


def test_item_with_only_unmasked_positions_in_chunk_is_not_read():
    item = Item(1, [(0, 5)], embed_mask=[True, False, False, False, True, True])
    plan = plan_batch([Request([item], prefix_len=1, extend_len=3)])
    assert plan.items == [] and plan.segments.shape == (0, 4)


def test_interleaved_items_are_placed_by_position():
    a = Item(1, [(10, 12), (20, 22)], embedding=torch.full((6, 1), 1.0))
    b = Item(2, [(14, 16)], embedding=torch.full((3, 1), 2.0))
    out = torch.zeros(25, 1)
    assemble([Request([a, b], 0, 25)], None, out=out, backend="torch")
    col = out[:, 0].tolist()
    assert col[10:13] == [1.0] * 3 and col[14:17] == [2.0] * 3 and col[20:23] == [1.0] * 3
    assert col[13] == 0.0 and col[17:20] == [0.0] * 3


def test_request_with_empty_chunk_contributes_nothing():
    item = Item(1, [(0, 2)], embedding=torch.ones(3, 4))
    plan = plan_batch([Request([item], 0, 0), Request([item], 0, 3)])
    assert plan.num_tokens == 3
    assert plan.segments.tolist() == [[0, 0, 0, 3]]
    assert plan.items[0].request == 1


@pytest.mark.parametrize("n_items", [1, 64, 256])
def test_planning_work_grows_with_items_not_tokens(n_items):
    # 4096-token items: segments stay one per item, never one per token
    items = [Item(i, [(i * 5000, i * 5000 + 4095)]) for i in range(n_items)]
    plan = plan_batch([Request(items, 0, n_items * 5000)])
    assert plan.segments.shape == (n_items, 4)
    assert np.array_equal(plan.segments[:, 3], np.full(n_items, 4096))


@given(batch=batches(max_requests=6))
def test_walked_and_indexed_planning_agree(batch):
    small = plan_batch(batch.requests, small_runs=10**9, path="walk")
    vectorised = plan_batch(batch.requests, small_runs=-1, path="walk")
    indexed = plan_batch(batch.requests, path="index")
    assert np.array_equal(small.segments, vectorised.segments)
    assert [(p.request, p.item.key) for p in small.items] == [
        (p.request, p.item.key) for p in vectorised.items]
    assert _by_item(indexed) == _by_item(small)  # the index lists items in position order


def _by_item(plan):
    """Segments with the planned item replaced by (request, key): independent of item order."""
    keys = [(p.request, p.item.key) for p in plan.items]
    assert len(set(keys)) == len(keys) and set(plan.segments[:, 0].tolist()) == set(range(len(keys)))
    return [(keys[i], r, o, n) for i, r, o, n in plan.segments.tolist()]


@given(batch=batches(max_requests=4))
def test_indexed_plan_matches_oracle_across_chunks(batch):
    # a request advanced with with_window keeps its index and stays exact in every chunk
    weight = torch.randn(batch.vocab, batch.hidden).to(batch.out_dtype)
    for req in batch.requests:
        if req.prompt_len == 0:
            continue
        cut = req.prompt_len // 2
        first = Request(req.items, 0, cut, prompt_len=req.prompt_len)
        chunk = first
        for step in range(2):
            if step:  # the next chunk, built after the first was planned (and indexed)
                chunk = first.with_window(cut, req.prompt_len - cut)
            ids = torch.randint(-2, batch.vocab + 2, (chunk.extend_len,))
            plan = plan_batch([chunk], path="index")
            walked = plan_batch([chunk], path="walk")
            assert _by_item(plan) == _by_item(walked)
            got = assemble([chunk], ids, weight=weight, backend="torch")
            want, _ = assemble_oracle([chunk], ids, _embedding, weight=weight)
            assert torch.equal(got, want)
        assert chunk._index is first._index is not None
