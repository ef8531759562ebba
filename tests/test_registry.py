"""The registry (``mmassembler.registry``): handles and slot ranges, a batch's shared
columns, removal that lets go of everything a request held, compaction, and the bounds
table the array fill reads."""

import pytest
import torch

from mmassembler.errors import BatchShapeError, CapacityError, UnknownHandleError
from mmassembler.items import Item
from mmassembler.registry import NEVER, Registry
from mmassembler.runs import NO_LIMIT, request_columns


def _add(reg, *requests):
    return reg.add(request_columns(list(requests)))


def test_a_batch_takes_contiguous_slots_and_shares_its_columns():
    reg = Registry(max_requests=4, max_runs=16, max_items=16)
    e = torch.zeros(2, 3)
    a, b = _add(reg, ([Item(1, [(0, 1)], embedding=e), Item(2, [(3, 4)])], 10), ([Item(3, [(2, 2)])], None))
    ra, rb = reg.recs[a], reg.recs[b]
    assert (ra.run0, ra.nruns, rb.run0, rb.nruns) == (0, 2, 2, 1)
    assert (ra.i0, ra.nitems, rb.i0, rb.nitems) == (0, 2, 2, 1)
    assert ra.batch is rb.batch and ra.batch.embs[0] is e and rb.prompt == NO_LIMIT
    assert ra.fresh and (ra.lo, ra.hi) == (NO_LIMIT, -1)  # its first window goes the slow way
    assert reg.num_live == 2 and (reg.live_runs, reg.live_items) == (3, 3)


def test_removal_lets_go_of_embeddings_encoder_inputs_and_sources():
    reg = Registry(max_requests=4, max_runs=16, max_items=16)
    e = torch.zeros(2, 3)
    obj = object()
    h, keep = _add(reg, ([Item(1, [(0, 1)], embedding=e, data=obj)], 4), ([Item(2, [(0, 0)])], 4))
    rec = reg.recs[h]
    rec.batch.srcs[rec.a] = (e, 0, (0, 3, 2, 3, 0), -1)
    rec.held[rec.a] = None
    released = reg.remove([h])
    assert released == [e] and reg.recs[h] is None
    b = rec.batch
    assert b.embs[0] is None and b.objs[0] is None and b.srcs[0] is None
    assert reg.recs[keep] is not None and h in reg.stale
    reg.sync_req()
    assert tuple(reg.req[h]) == NEVER and not reg.stale


@pytest.mark.parametrize("handles,err", [([9], UnknownHandleError), ([0], UnknownHandleError),
                                         ([1, 1], BatchShapeError), ([1.0], BatchShapeError)])
def test_bad_removals_change_nothing(handles, err):
    reg = Registry(max_requests=4, max_runs=16, max_items=16)
    _add(reg, ([Item(1, [(0, 1)])], 4))
    before = reg.snapshot()
    with pytest.raises(err):
        reg.remove(handles)
    assert reg.snapshot() == before


def test_compaction_moves_live_ranges_down_and_forgets_their_upload():
    reg = Registry(max_requests=4, max_runs=4, max_items=4)
    a, b = _add(reg, ([Item(1, [(0, 1)]), Item(2, [(2, 3)])], 8), ([Item(3, [(0, 0)])], 8))
    reg.recs[b].fresh = False
    reg.remove([a])
    (c,) = _add(reg, ([Item(4, [(0, 0)]), Item(5, [(2, 2)])], 8))  # needs the bottom: compacts
    rb, rc = reg.recs[b], reg.recs[c]
    assert (rb.run0, rc.run0, rb.i0, rc.i0) == (0, 1, 0, 1)
    assert rb.fresh and (rb.lo, rb.hi) == (NO_LIMIT, -1)
    with pytest.raises(CapacityError):
        _add(reg, ([Item(6, [(0, 0)]), Item(7, [(2, 2)])], 8))


def test_capacity_is_checked_before_any_change():
    reg = Registry(max_requests=1, max_runs=4, max_items=4)
    _add(reg, ([], 4))
    before = reg.snapshot()
    with pytest.raises(CapacityError, match="remove finished requests"):
        _add(reg, ([Item(1, [(0, 0)])], 4))
    assert reg.snapshot() == before and reg.num_live == 1
