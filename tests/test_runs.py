"""The run builder: a batch of new requests' items as position-ordered runs, built in plain
Python, ≡ a naive per-position layout; errors name the request and item."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmassembler import EmbedMaskError, Item, SpanError
from mmassembler.errors import BatchShapeError
from mmassembler.runs import NO_LIMIT, request_columns
from mmassembler.runs import build_runs as _build_runs


class Built:
    """One request's share of a batch's runs, named."""

    def __init__(self, b, r, a):
        k0, n, self.simple = b.ra[r], b.nruns[r], b.simple[r]
        self.rpos, self.rend = b.rpos[k0:k0 + n], b.rend[k0:k0 + n]
        self.rrow = None if b.rrow is None else b.rrow[k0:k0 + n]
        self.ritem = None if b.ritem is None else b.ritem[k0:k0 + n]
        self.a = a


def build_runs(new):
    b = _build_runs(new)
    out, a = [], 0
    for r, c in enumerate(new.counts):
        one = Built(b, r, a)
        one.rows, one.iend = b.rows[a:a + c], b.iend[a:a + c]
        out.append(one)
        a += c
    return out


def naive_positions(items) -> dict:
    """position -> (item index, row) for one request, one position at a time."""
    taken = {}
    for j, it in enumerate(items):
        positions = [p for s, e in it.spans for p in range(s, e + 1)]
        mask = it.embed_mask if it.embed_mask is not None else [True] * len(positions)
        rows = [p for p, m in zip(positions, mask) if m]
        for r, p in enumerate(rows):
            taken[p] = (j, r)
    return taken


def run_rows(b) -> list:
    """A built request's runs as ``(pos, end, row, item)`` (a simple one's items are its runs)."""
    n = len(b.rpos)
    rows = [0] * n if b.simple else b.rrow
    items = list(range(n)) if b.simple else b.ritem
    return [list(r) for r in zip(b.rpos, b.rend, rows, items)]


def expanded(runs: list) -> dict:
    got = {}
    for pos, end, row, item in runs:
        for k in range(end - pos):
            got[pos + k] = (item, row + k)
    return got


@st.composite
def requests(draw, max_requests=5, max_items=5):
    reqs = []
    for _ in range(draw(st.integers(0, max_requests))):
        n = draw(st.integers(0, max_items))
        blocks = [(i, draw(st.integers(1, 5))) for i in range(n) for _ in range(draw(st.integers(1, 3)))]
        if draw(st.booleans()):
            blocks = draw(st.permutations(blocks))
        pos, spans = draw(st.integers(0, 3)), [[] for _ in range(n)]
        for i, length in blocks:
            spans[i].append((pos, pos + length - 1))
            pos += length + draw(st.integers(0, 2))  # 0: adjacent spans, coalesced when one item's
        items = []
        for i in range(n):
            positions = sum(e - s + 1 for s, e in spans[i])
            mask = [draw(st.booleans()) for _ in range(positions)] if draw(st.integers(0, 3)) == 0 else None
            items.append(Item(draw(st.integers(0, 10**6)), spans[i], embed_mask=mask))
        reqs.append((items, draw(st.sampled_from([None, pos, pos + 3]))))
    return reqs


@given(reqs=requests())
def test_runs_place_every_position_as_the_naive_layout(reqs):
    built = build_runs(request_columns(reqs))
    assert len(built) == len(reqs)
    for b, (items, _) in zip(built, reqs):
        runs = run_rows(b)
        assert all(a[1] <= z[0] for a, z in zip(runs, runs[1:]))  # position-ordered, disjoint
        assert expanded(runs) == naive_positions(items)
        for j, it in enumerate(items):
            want = naive_positions([it])
            assert b.rows[j] == len(want)
            assert b.iend[j] == (max(want) + 1 if want else 0)
        if b.simple:  # run k is item k from its row 0
            assert [r[3] for r in runs] == list(range(len(items))) and not any(r[2] for r in runs)


def test_adjacent_spans_of_one_item_coalesce_and_interleaved_items_do_not():
    a = Item(1, [(0, 3), (4, 5), (9, 9)])
    b = Item(2, [(6, 8)])
    built = build_runs(request_columns([([a, b], None)]))
    assert run_rows(built[0]) == [[0, 6, 0, 0], [6, 9, 0, 1], [9, 10, 6, 0]] and not built[0].simple


@pytest.mark.parametrize("n_items", [1, 64, 256])
def test_runs_grow_with_items_not_tokens(n_items):
    items = [Item(i, [(i * 5000, i * 5000 + 4095)]) for i in range(n_items)]
    built = build_runs(request_columns([(items, None)]))[0]
    assert len(built.rpos) == n_items and built.simple
    assert all(e - s == 4096 for s, e in zip(built.rpos, built.rend))


BAD = [
    ("overlap", [Item(1, [(0, 3)]), Item(2, [(3, 5)])], SpanError, 1),
    ("unordered", [Item(1, [(5, 6), (0, 1)])], SpanError, 0),
    ("past prompt", [Item(1, [(8, 12)])], SpanError, 0),
    ("negative", [Item(1, [(-1, 2)])], SpanError, 0),
    ("end before start", [Item(1, [(3, 2)])], SpanError, 0),
    ("float", [Item(1, [(0.0, 3)])], SpanError, 0),
    ("bool", [Item(1, [(True, 3)])], SpanError, 0),
    ("huge", [Item(1, [(0, 2**64)])], SpanError, 0),
    ("no spans", [Item(1, [])], SpanError, 0),
    ("triple", [Item(1, [(0, 1, 2)])], SpanError, 0),
    ("mask length", [Item(1, [(0, 3)], embed_mask=[True])], EmbedMaskError, 0),
    ("masked overlap", [Item(1, [(0, 3)], embed_mask=[True] * 4), Item(2, [(2, 2)])], SpanError, 1),
]


@pytest.mark.parametrize("name,items,err,bad", BAD, ids=[b[0] for b in BAD])
def test_bad_spans_name_the_request_and_item(name, items, err, bad):
    good = [Item(9, [(0, 1)])]
    with pytest.raises(err) as info:
        build_runs(request_columns([(good, 10), (items, 10)]))
    assert info.value.request == 1 and info.value.item_key == items[bad].key
    assert f"requests[1]: items[{bad}]" in str(info.value)


def test_numpy_spans_are_read_as_ints():
    items = [Item(1, np.array([[2, 4], [7, 8]])), Item(2, [(np.int32(5), np.int64(6))])]
    built = build_runs(request_columns([(items, 10)]))
    assert run_rows(built[0]) == [[2, 5, 0, 0], [5, 7, 0, 1], [7, 9, 3, 0]]


@pytest.mark.parametrize("requests_arg", [None, [[Item(1, [(0, 1)])]], [(Item(1, [(0, 1)]),)],
                                          [([Item(1, [(0, 1)])], 4, 5)], "ab", [(iter([]), None)]])
def test_malformed_request_lists_are_typed(requests_arg):
    with pytest.raises((BatchShapeError, SpanError)):
        request_columns(requests_arg)


def test_prompt_lengths_are_checked():
    with pytest.raises(BatchShapeError):
        request_columns([([], -1)])
    with pytest.raises(BatchShapeError):
        request_columns([([], NO_LIMIT + 1)])
    with pytest.raises(BatchShapeError):
        request_columns([([], 2.0)])
