"""``mmassembler.testing``: its strategies drive property tests, ``assert_assembled`` names
the first wrong row, and encoders answering in every accepted form give the same rows."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mmassembler import EmbeddingCache, Item, Request, assemble
from mmassembler.testing import assert_assembled, batches, encoder_outputs


@given(batch=batches(max_requests=4))
def test_the_library_passes_its_own_assertion(batch):
    weight = torch.randn(batch.vocab, batch.hidden).to(batch.out_dtype)
    out = assemble(batch.requests, batch.input_ids, weight=weight, backend="torch")
    assert_assembled(out, batch.requests, batch.input_ids, weight=weight)


def test_assert_assembled_names_the_wrong_row_by_request_position_and_item():
    a = Item(11, [(2, 4)], embedding=torch.ones(3, 4))
    b = Item(12, [(1, 2)], embedding=torch.full((2, 4), 2.0))
    reqs = [Request([a], 0, 6), Request([b], 1, 3)]
    ids = torch.zeros(9, dtype=torch.long)
    weight = torch.randn(3, 4)
    out = assemble(reqs, ids, weight=weight)
    assert_assembled(out, reqs, ids, weight=weight)
    out[7, 1] = -1.0  # request 1, position 2: item 0 (key 12)
    with pytest.raises(AssertionError, match=r"row 7 \(request 1, prompt position 2: item 0 \(key 12\)\)"):
        assert_assembled(out, reqs, ids, weight=weight)
    out = assemble(reqs, ids, weight=weight)
    out[0] += 1  # a text row
    with pytest.raises(AssertionError, match="request 0, prompt position 0: text"):
        assert_assembled(out, reqs, ids, weight=weight)


@given(data=st.data(), rows=st.lists(st.integers(1, 5), min_size=1, max_size=5))
def test_encoders_answering_in_any_accepted_form_give_the_same_rows(data, rows):
    tensors = [torch.randn(n, 8) for n in rows]
    answer = data.draw(encoder_outputs(tensors))
    items, pos = [], 0
    for k, n in enumerate(rows):
        items.append(Item(k, [(pos + 1, pos + n)], data=k))
        pos += n + 1
    req = Request(items, 0, pos)
    got = assemble([req], torch.zeros(pos, dtype=torch.long), weight=torch.zeros(1, 8),
                   encoders={"image": lambda its: answer}, cache=EmbeddingCache(1 << 20))
    assert_assembled(got, [req], torch.zeros(pos, dtype=torch.long), weight=torch.zeros(1, 8),
                     embedding_of=lambda it: tensors[it.data])
