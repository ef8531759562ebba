"""The stateless path: a batch of Requests as one step (reached runs, step table, wanted
items) and ``assemble`` on the reference backend ≡ the naive per-position oracle."""

import numpy as np
import pytest
import torch
from hypothesis import given
from strategies import batches

from mmassembler import (ChunkWindowError, Item, Request, RowCountError, SpanError, assemble,
                         assemble_oracle)
from mmassembler.request_step import request_step, step_sources
from mmassembler.resolve import Wanted, resolve
from mmkernels import layout as L


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


def _reached(step):
    """``(request, item key)`` of each reached item, and the runs as (pos, end, row, key)."""
    slots, owner, index, _ = step.reached_items()
    key = {s: step.requests[r].items[j].key for s, r, j in zip(slots.tolist(), owner.tolist(),
                                                               index.tolist())}
    return ([(r, key[s]) for s, r in zip(slots.tolist(), owner.tolist())],
            [(p, e, r, key[i]) for p, e, r, i in step.runs.tolist()])


def _request_rows(step, r):
    row = step.table[1 + r]
    return (int(row[L.STEP_BASE]), int(row[L.STEP_PREFIX]), int(row[L.STEP_RUN_FIRST]),
            int(row[L.STEP_RUN_END]))


def test_items_outside_the_window_are_not_reached():
    past = Item(1, [(0, 3)])
    inside = Item(2, [(10, 12)])
    future = Item(3, [(30, 40)])
    step = request_step([Request([past, inside, future], prefix_len=5, extend_len=20)])
    assert _reached(step) == ([(0, 2)], [(10, 13, 0, 2)])  # the kernel clips runs to windows
    assert _request_rows(step, 0) == (0, 5, 0, 1) and step.num_tokens == 20
    assert step.table[0, L.STEP_TOKENS] == 20 and step.table[0, L.STEP_REQUESTS] == 1
    assert step.table[2, L.STEP_BASE] == 20


def test_window_cuts_through_a_multi_span_item():
    item = Item(1, [(2, 5), (9, 12)])  # rows 0-3 at 2-5, rows 4-7 at 9-12
    step = request_step([Request([item], prefix_len=4, extend_len=7)])  # positions 4..10
    assert _reached(step) == ([(0, 1)], [(2, 6, 0, 1), (9, 13, 4, 1)])
    assert step.reached_items()[3].tolist() == [8]


def test_masked_positions_split_runs_and_skip_rows():
    item = Item(1, [(0, 5)], embed_mask=[True, False, True, True, False, True])
    lay = item.layout()
    assert lay.num_rows == 4
    assert lay.runs.tolist() == [[0, 1, 0], [2, 4, 1], [5, 6, 3]]


def test_item_with_only_unmasked_positions_in_window_is_not_read():
    item = Item(1, [(0, 5)], embed_mask=[True, False, False, False, True, True])
    step = request_step([Request([item], prefix_len=1, extend_len=3)])
    assert len(step.reached_items()[0]) == 0 and step.runs.shape == (0, L.HOST_RUN_FIELDS)


def test_interleaved_items_are_placed_by_position():
    a = Item(1, [(10, 12), (20, 22)], embedding=torch.full((6, 1), 1.0))
    b = Item(2, [(14, 16)], embedding=torch.full((3, 1), 2.0))
    out = torch.zeros(25, 1)
    assemble([Request([a, b], 0, 25)], None, out=out, backend="torch")
    col = out[:, 0].tolist()
    assert col[10:13] == [1.0] * 3 and col[14:17] == [2.0] * 3 and col[20:23] == [1.0] * 3
    assert col[13] == 0.0 and col[17:20] == [0.0] * 3


def test_request_with_empty_window_contributes_nothing():
    item = Item(1, [(0, 2)], embedding=torch.ones(3, 4))
    step = request_step([Request([item], 0, 0), Request([item], 0, 3)])
    assert step.num_tokens == 3
    assert _reached(step) == ([(1, 1)], [(0, 3, 0, 1)])
    assert _request_rows(step, 0) == (0, 0, 0, 0) and _request_rows(step, 1) == (0, 0, 0, 1)


def test_one_key_in_two_requests_is_one_wanted_item_per_request():
    a, b = Item(7, [(1, 2)]), Item(7, [(0, 1)])
    step = request_step([Request([a], 0, 4), Request([Item(8, [(5, 5)]), b], 0, 3)])
    assert _reached(step)[0] == [(0, 7), (1, 7)]  # step_sources dedupes keys, not the table
    assert _request_rows(step, 1) == (4, 0, 1, 2)


@pytest.mark.parametrize("n_items", [1, 64, 256])
def test_runs_grow_with_items_not_tokens(n_items):
    # 4096-token items: one run per item, never one per token
    items = [Item(i, [(i * 5000, i * 5000 + 4095)]) for i in range(n_items)]
    step = request_step([Request(items, 0, n_items * 5000)])
    assert step.runs.shape == (n_items, L.HOST_RUN_FIELDS)
    assert np.array_equal(step.runs[:, L.HOST_RUN_END] - step.runs[:, L.HOST_RUN_POS],
                          np.full(n_items, 4096))


def test_span_errors_name_the_request():
    good = Request([Item(1, [(0, 1)])], 0, 2)
    bad = Request([Item(2, [(3, 1)])], 0, 2)
    with pytest.raises(SpanError) as info:
        request_step([good, bad])
    assert info.value.request == 1 and info.value.item_key == 2
    assert str(info.value).startswith("request 1, item 2: ")


@given(batch=batches(max_requests=4))
def test_runs_are_kept_across_chunks(batch):
    # a request advanced with with_window keeps its checked runs and stays exact in every chunk
    weight = torch.randn(batch.vocab, batch.hidden).to(batch.out_dtype)
    for req in batch.requests:
        if req.prompt_len == 0:
            continue
        cut = req.prompt_len // 2
        first = Request(req.items, 0, cut, prompt_len=req.prompt_len)
        chunk = first
        for step in range(2):
            if step:  # the next chunk, built after the first was assembled
                chunk = first.with_window(cut, req.prompt_len - cut)
            ids = torch.randint(-2, batch.vocab + 2, (chunk.extend_len,))
            got = assemble([chunk], ids, weight=weight, backend="torch")
            want, _ = assemble_oracle([chunk], ids, _embedding, weight=weight)
            assert torch.equal(got, want)
        assert chunk._runs is first._runs is not None


@given(batch=batches(max_requests=6, deepstack=True))
def test_kept_request_sources_equal_resolving_each_item(batch):
    # the per-request memo (every item precomputed) against resolve(), the Assembler's resolver
    step = request_step(batch.requests)
    widths = (batch.hidden, batch.hidden + batch.ds_cols)
    for _ in range(2):  # the memo is built, then read
        sources, entries = step_sources(step, encoders=None, cache=None, device=torch.device("cpu"),
                                        widths=widths)
        slots, owner, index, rows = step.reached_items()
        wanted = [Wanted(s, step.requests[r].items[j], n, r) for s, r, j, n in zip(
            slots.tolist(), owner.tolist(), index.tolist(), rows.tolist())]
        want, want_entries = resolve(wanted, encoders=None, cache=None, device=torch.device("cpu"),
                                     widths=widths)
        got = [sources[s] for s in slots.tolist()]
        assert [(t.data_ptr(), t.shape, t.stride()) for t in got] == [
            (t.data_ptr(), t.shape, t.stride()) for t in want]
        assert entries[slots].tolist() == [list(e) for e in want_entries]


def test_a_bad_embedding_outside_the_window_is_not_read():
    good = Item(1, [(0, 1)], embedding=torch.ones(2, 4))
    bad = Item(2, [(10, 11)], embedding=torch.ones(3, 4))  # 3 rows for 2 placeholders
    req = Request([good, bad], 0, 4, prompt_len=12)
    out = assemble([req], None, out=torch.zeros(4, 4), backend="torch")
    assert torch.equal(out[:2], torch.ones(2, 4)) and torch.equal(out[2:], torch.zeros(2, 4))
    with pytest.raises(RowCountError) as info:
        assemble([req.with_window(8, 4)], None, out=torch.zeros(4, 4), backend="torch")
    assert info.value.request == 0 and info.value.item_key == 2


def test_an_item_checked_before_is_checked_again_in_a_new_request():
    # the item keeps its checked embedding after the first failure; a new Request that
    # reads it must still see the row count is wrong
    bad = Item(5, [(0, 3)], embedding=torch.ones(3, 4))  # 3 rows for 4 placeholders
    for _ in range(2):
        with pytest.raises(RowCountError) as info:
            assemble([Request([bad], 0, 4)], None, out=torch.zeros(4, 4), backend="torch")
        assert info.value.item_key == 5
    assert bad._checked_embedding is not None


def test_a_reused_request_costs_the_same_calls_at_1_and_256_items(monkeypatch):
    # items that carry embeddings are kept per request: a reused request's step makes no
    # call per item (the launch is stubbed out: the interpreter would run the kernel here)
    from test_assembler_host_work import count_calls

    import mmassembler.api as api
    monkeypatch.setattr(api, "assemble_step", lambda out, *args, **kwargs: out)

    def calls(n_items):
        items = [Item(k, [(3 * k + 1, 3 * k + 2)], embedding=torch.randn(2, 8)) for k in range(n_items)]
        req = Request(items, 0, 3 * n_items + 1, prompt_len=3 * n_items + 1)
        ids, weight = torch.zeros(3 * n_items + 1, dtype=torch.int64), torch.randn(4, 8)
        for _ in range(2):  # the first step builds the runs, the second keeps the sources
            assemble([req], ids, weight=weight)
        return count_calls(lambda: assemble([req], ids, weight=weight))

    assert calls(1) == calls(256)


def test_a_request_works_after_a_step_that_failed_on_another():
    ok = Request([Item(1, [(0, 1)], embedding=torch.ones(2, 4))], 0, 2)
    bad = Request([Item(2, [(0, 1)])], 3, 2, prompt_len=4)  # window past its prompt
    out = torch.zeros(4, 4)
    with pytest.raises(ChunkWindowError) as info:
        assemble([ok, bad], None, out=out, backend="torch")
    assert info.value.request == 1 and torch.equal(out, torch.zeros(4, 4))
    out = assemble([ok], None, out=torch.zeros(2, 4), backend="torch")
    assert torch.equal(out, torch.ones(2, 4))
