"""The one pool of tables for one-shot calls (``mmkernels.pool``): sized for a call before
anything is written, grown by ``capacity_for``, never past the request limit, shared by
the stateless ``assemble`` and the segment ops."""

import pytest
import torch

import mmassembler.api as api
import mmkernels
from mmassembler import CapacityError, Item, Request, assemble
from mmkernels import CapacityLimitError, capacity_for, table_pool

H = 4


def test_capacity_for_grows_to_powers_of_two_and_refuses_past_the_limit():
    assert capacity_for(5, 8, 1) == 8  # fits: kept
    assert capacity_for(9, 8, 1) == 16
    assert capacity_for(3, 0, 64) == 64  # at least the least
    assert capacity_for(40, 0, 16, 64) == 64
    with pytest.raises(CapacityLimitError):
        capacity_for(65, 0, 16, 64)


def test_too_many_requests_are_refused_before_any_table_grows(monkeypatch, device):
    """More requests than the limit is a CapacityError before the pool grows (it used to
    double the run table until memory ran out)."""
    monkeypatch.setattr(api, "MAX_REQUESTS", 8)
    weight = torch.randn(5, H, device=device)
    pool = table_pool(torch.device(device), mmkernels.resolve_backend("auto", device))
    assemble([Request([], 0, 1)], torch.zeros(1, dtype=torch.long, device=device), weight=weight)
    before = pool.tables
    with pytest.raises(CapacityError, match="exceed the limit of 8"):
        assemble([Request([], 0, 1)] * 9, torch.zeros(9, dtype=torch.long, device=device), weight=weight)
    assert pool.tables is before


def test_a_call_larger_than_the_pool_grows_it_once_and_smaller_calls_keep_it(device):
    weight = torch.randn(5, H, device=device)
    pool = table_pool(torch.device(device), mmkernels.resolve_backend("auto", device))
    n = 300
    emb = torch.randn(n, 1, H, device=device)
    reqs = [Request([Item(i, [(0, 0)], embedding=emb[i])], 0, 1) for i in range(n)]
    out = assemble(reqs, torch.zeros(n, dtype=torch.long, device=device), weight=weight)
    assert torch.equal(out, emb[:, 0])
    grown = pool.tables
    assert grown.max_requests >= n
    assemble(reqs[:3], torch.zeros(3, dtype=torch.long, device=device), weight=weight)
    assert pool.tables is grown


def test_segment_ops_and_stateless_calls_share_the_pool(device):
    pool = table_pool(torch.device(device), mmkernels.resolve_backend("triton", device))
    out = torch.zeros(4, H, device=device)
    src = torch.randn(3, H, device=device)
    mmkernels.gather_rows(out, [src], [(0, 1, 2, 2)], backend="triton")
    tables = pool.tables
    assert torch.equal(out[2:], src[1:3])
    weight = torch.randn(5, H, device=device)
    got = assemble([Request([Item(1, [(1, 1)], embedding=src[:1])], 0, 2)],
                   torch.zeros(2, dtype=torch.long, device=device), weight=weight, backend="triton")
    assert pool.tables is tables and torch.equal(got[1], src[0])
