"""``Assembler.plan`` / ``Assembler.run``: all host work in the plan, the upload and launch
in the run. Plans run in order and once; a plan replaced before it ran leaves its rows to
be staged again; a request removed or added between plan and run changes nothing the plan
reads. CPU: the torch backend and the Triton interpreter (whose tables go up as on a GPU)."""

import pytest
import torch

from mmassembler import Assembler, BatchShapeError, Item

H = 8
BACKENDS = ["torch", "triton"]


def _rows(value, n=4, device="cpu"):
    return torch.full((n, H), float(value), device=device)


def _assembler(device, backend, **kw):
    weight = torch.randn(20, H, device=device)
    encoders = {"image": lambda items: [_rows(it.key, it.num_rows, device) for it in items]}
    return weight, Assembler(weight=weight, max_tokens=64, max_requests=4, backend=backend, encoders=encoders, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_then_run_is_assemble(device, backend):
    weight, asm = _assembler(device, backend)
    a = asm.add_request([Item(1, [(1, 4)]), Item(2, [(6, 8)])], 10)
    ids = torch.arange(10, device=device) % 20
    plan = asm.plan([a], [0], [10], ids)
    assert plan.num_tokens == 10 and plan.num_requests == 1
    got = asm.run(plan).clone()
    again = asm.assemble([a], [0], [10], ids)
    assert torch.equal(got, again)
    assert torch.equal(got[1:5], _rows(1, device=device)) and torch.equal(got[6:8], _rows(2, 2, device))
    assert torch.equal(got[0], weight[0]) and torch.equal(got[5], weight[5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plan_runs_once_and_only_while_it_is_the_latest(device, backend):
    _, asm = _assembler(device, backend)
    a = asm.add_request([Item(1, [(1, 4)])], 8)
    ids = torch.zeros(8, dtype=torch.long, device=device)
    plan = asm.plan([a], [0], [8], ids)
    asm.run(plan)
    with pytest.raises(BatchShapeError, match="latest plan"):
        asm.run(plan)
    old = asm.plan([a], [0], [8], ids)
    asm.assemble([a], [0], [8], ids)
    with pytest.raises(BatchShapeError, match="latest plan"):
        asm.run(old)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_replaced_plan_leaves_its_requests_to_be_met_again(device, backend):
    """The replaced plan met ``a`` (rows staged, never sent); the next steps still give a's
    rows, and b's, and the encoder ran once for each."""
    calls = []

    def encoder(items):
        calls.extend(it.key for it in items)
        return [_rows(it.key, it.num_rows, device) for it in items]
    asm = Assembler(weight=torch.randn(20, H, device=device), max_tokens=64, max_requests=4, backend=backend,
                    encoders={"image": encoder})
    a = asm.add_request([Item(1, [(1, 4)])], 8)
    b = asm.add_request([Item(2, [(2, 5)])], 8)
    ids = torch.zeros(8, dtype=torch.long, device=device)
    asm.plan([a], [0], [8], ids)
    got_b = asm.run(asm.plan([b], [0], [8], ids)).clone()
    got_a = asm.assemble([a], [0], [8], ids)
    assert torch.equal(got_b[2:6], _rows(2, device=device)) and torch.equal(got_a[1:5], _rows(1, device=device))
    assert sorted(calls) == [1, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_removing_and_adding_between_plan_and_run(device, backend):
    """A request removed after the plan that reads it, and a new one added in its slot: the
    plan still gives the removed request's rows, the next step the new one's."""
    _, asm = _assembler(device, backend)
    a = asm.add_request([Item(1, [(1, 4)])], 8)
    ids = torch.zeros(8, dtype=torch.long, device=device)
    plan = asm.plan([a], [0], [8], ids)
    asm.remove_request(a)
    c = asm.add_request([Item(3, [(0, 3)])], 8)
    got = asm.run(plan).clone()
    assert torch.equal(got[1:5], _rows(1, device=device))
    got_c = asm.assemble([c], [0], [8], ids)
    assert torch.equal(got_c[0:3], _rows(3, 3, device))
    assert asm.stats()["live_requests"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_compaction_between_plan_and_run(device, backend):
    """Slots taken from the top run out between a plan and its run, so the registry moves
    every live request down: the plan still reads its rows where it staged them, and the
    next steps are right for the moved requests and the new one."""
    weight = torch.randn(20, H, device=device)
    asm = Assembler(weight=weight, max_tokens=64, max_requests=4, max_runs=3, max_items=3, backend=backend)
    keep = asm.add_request([Item(1, [(1, 4)], embedding=_rows(1, device=device))], 8)
    gone = asm.add_request([Item(2, [(0, 1)], embedding=_rows(2, 2, device))], 8)
    last = asm.add_request([Item(3, [(2, 3)], embedding=_rows(3, 2, device))], 8)
    ids = torch.zeros(8, dtype=torch.long, device=device)
    asm.assemble([keep, gone], [0, 0], [8, 8], torch.zeros(16, dtype=torch.long, device=device))
    plan = asm.plan([keep, last], [0, 0], [8, 8], torch.zeros(16, dtype=torch.long, device=device))
    asm.remove_request(gone)
    new = asm.add_request([Item(4, [(5, 7)], embedding=_rows(4, 3, device))], 8)  # compacts
    got = asm.run(plan).clone()
    assert torch.equal(got[1:5], _rows(1, device=device)) and torch.equal(got[10:12], _rows(3, 2, device))
    after = asm.assemble([new, keep, last], [0, 0, 0], [8, 8, 8], torch.zeros(24, dtype=torch.long, device=device))
    assert torch.equal(after[5:8], _rows(4, 3, device)) and torch.equal(after[9:13], _rows(1, device=device))
    assert torch.equal(after[18:20], _rows(3, 2, device)) and torch.equal(after[0], weight[0])
    del ids
