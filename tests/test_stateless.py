"""The stateless path: a batch of Requests as a first contact on the Assembler's machinery
(register, step, remove) on the reference backend ≡ the naive per-position oracle."""

import pytest
import torch
from hypothesis import given
from strategies import batches

from mmassembler import (ChunkWindowError, Item, Request, RowCountError, SpanError, assemble,
                         assemble_oracle)


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


def test_masked_positions_split_runs_and_skip_rows():
    item = Item(1, [(0, 5)], embed_mask=[True, False, True, True, False, True])
    lay = item.layout()
    assert lay.num_rows == 4
    assert lay.runs.tolist() == [[0, 1, 0], [2, 4, 1], [5, 6, 3]]


def test_interleaved_items_are_placed_by_position():
    a = Item(1, [(10, 12), (20, 22)], embedding=torch.full((6, 1), 1.0))
    b = Item(2, [(14, 16)], embedding=torch.full((3, 1), 2.0))
    out = torch.zeros(25, 1)
    assemble([Request([a, b], 0, 25)], None, out=out, backend="torch")
    col = out[:, 0].tolist()
    assert col[10:13] == [1.0] * 3 and col[14:17] == [2.0] * 3 and col[20:23] == [1.0] * 3
    assert col[13] == 0.0 and col[17:20] == [0.0] * 3


def test_span_errors_name_the_request():
    good = Request([Item(1, [(0, 1)])], 0, 2)
    bad = Request([Item(2, [(3, 1)])], 0, 2)
    with pytest.raises(SpanError) as info:
        assemble([good, bad], None, out=torch.zeros(4, 1), backend="torch")
    assert info.value.request == 1 and info.value.item_key == 2
    assert str(info.value).startswith("request 1, item 2: ")


@given(batch=batches(max_requests=4))
def test_a_request_advanced_with_with_window_is_exact_in_every_chunk(batch):
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
    # a new Request that reads an item whose embedding failed before fails again
    bad = Item(5, [(0, 3)], embedding=torch.ones(3, 4))  # 3 rows for 4 placeholders
    for _ in range(2):
        with pytest.raises(RowCountError) as info:
            assemble([Request([bad], 0, 4)], None, out=torch.zeros(4, 4), backend="torch")
        assert info.value.item_key == 5


def test_a_request_works_after_a_step_that_failed_on_another():
    ok = Request([Item(1, [(0, 1)], embedding=torch.ones(2, 4))], 0, 2)
    bad = Request([Item(2, [(0, 1)])], 3, 2, prompt_len=4)  # window past its prompt
    out = torch.zeros(4, 4)
    with pytest.raises(ChunkWindowError) as info:
        assemble([ok, bad], None, out=out, backend="torch")
    assert info.value.request == 1 and torch.equal(out, torch.zeros(4, 4))
    out = assemble([ok], None, out=torch.zeros(2, 4), backend="torch")
    assert torch.equal(out, torch.ones(2, 4))
