"""Faults on the GPU: what is queued when a step fails, a plan that never runs, tables
dropped while a kernel that reads them is queued, steps on two streams, a graph replayed
after a failed step. Each checks the rows (and that a failed step wrote nothing). A sleep
kernel keeps the queue busy so the host runs ahead of the GPU, as it does in serving.
Run them under ``compute-sanitizer --tool memcheck`` and ``--tool racecheck`` too (see
the README)."""

import pytest
import torch

from mmassembler import Assembler, EmbeddingCache, Item, Request, RowCountError, assemble

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
H = 64
SLEEP = 50_000_000  # GPU cycles: tens of milliseconds of queue ahead of the host


def _rows(value, n=4):
    return torch.full((n, H), float(value), device="cuda")


def test_a_failed_step_sends_nothing_and_the_next_step_is_right():
    weight = torch.randn(20, H, device="cuda")
    asm = Assembler(weight=weight, max_tokens=64, max_requests=4)
    a = asm.add_request([Item(1, [(1, 4)], embedding=_rows(1))], 8)
    b = asm.add_request([Item(2, [(1, 4)], embedding=_rows(2, 5))], 8)  # one row too many
    ids = torch.zeros(16, dtype=torch.long, device="cuda")
    out = torch.full((16, H), 9.0, device="cuda")
    torch.cuda._sleep(SLEEP)
    with pytest.raises(RowCountError):
        asm.assemble([a, b], [0, 0], [8, 8], ids, out=out)
    got = asm.assemble([a], [0], [8], ids[:8])
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full((16, H), 9.0, device="cuda"))
    assert torch.equal(got[1:5], _rows(1)) and torch.equal(got[0], weight[0])


def test_a_plan_replaced_before_it_ran_leaves_no_unsent_row_behind():
    weight = torch.randn(20, H, device="cuda")
    asm = Assembler(weight=weight, max_tokens=64, max_requests=4)
    a = asm.add_request([Item(1, [(1, 4)], embedding=_rows(1))], 8)
    b = asm.add_request([Item(2, [(2, 5)], embedding=_rows(2))], 8)
    ids = torch.zeros(8, dtype=torch.long, device="cuda")
    torch.cuda._sleep(SLEEP)
    asm.plan([a], [0], [8], ids)  # meets a: its rows staged, never sent
    got_b = asm.run(asm.plan([b], [0], [8], ids))
    got_a = asm.assemble([a], [0], [8], ids)  # a's rows must go up now
    torch.cuda.synchronize()
    assert torch.equal(got_b[2:6], _rows(2)) and torch.equal(got_a[1:5], _rows(1))
    with pytest.raises(Exception, match="latest plan"):
        plan = asm.plan([a], [0], [8], ids)
        asm.assemble([b], [0], [8], ids)
        asm.run(plan)


def test_pool_tables_dropped_while_a_kernel_reads_them():
    weight = torch.randn(20, H, device="cuda")
    torch.cuda._sleep(SLEEP)
    small = [Request([Item(1, [(0, 3)], embedding=_rows(1))], 0, 6)]
    first = assemble(small, torch.zeros(6, dtype=torch.long, device="cuda"), weight=weight)
    many = [Request([Item(100 + i, [(0, 0)], embedding=_rows(i, 1))], 0, 1) for i in range(300)]
    second = assemble(many, torch.zeros(300, dtype=torch.long, device="cuda"), weight=weight)  # the pool grows
    third = assemble(small, torch.zeros(6, dtype=torch.long, device="cuda"), weight=weight)
    torch.cuda.synchronize()
    assert torch.equal(first[:4], _rows(1)) and torch.equal(third[:4], _rows(1))
    assert torch.equal(second, torch.arange(300, device="cuda", dtype=torch.float32)[:, None].expand(300, H))


def test_steps_on_two_streams_each_read_their_own_table():
    weight = torch.randn(20, H, device="cuda")
    asm = Assembler(weight=weight, max_tokens=64, max_requests=4)
    a = asm.add_request([Item(1, [(1, 4)], embedding=_rows(1))], 8)
    b = asm.add_request([Item(2, [(3, 6)], embedding=_rows(2))], 8)
    ids = torch.zeros(8, dtype=torch.long, device="cuda")
    asm.assemble([a], [0], [8], ids)
    asm.assemble([b], [0], [8], ids)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(s1):
        torch.cuda._sleep(SLEEP)  # the first step's kernel waits behind this
        out_a = asm.assemble([a], [0], [8], ids)
    with torch.cuda.stream(s2):
        out_b = asm.assemble([b], [0], [8], ids)  # its table goes up while a's kernel is queued
    torch.cuda.synchronize()
    assert torch.equal(out_a[1:5], _rows(1)) and torch.equal(out_b[3:7], _rows(2))
    assert torch.equal(out_a[5:], weight[[0, 0, 0]]) and torch.equal(out_b[:3], weight[[0, 0, 0]])


def test_a_graph_replays_right_after_a_failed_step():
    weight = torch.randn(20, H, device="cuda")
    bad = {"on": False}

    def encoder(items):
        if bad["on"]:
            raise RuntimeError("encoder failed")
        return [_rows(it.key) for it in items]
    asm = Assembler(weight=weight, max_tokens=64, max_requests=4, cuda_graph=True, encoders={"image": encoder},
                    cache=EmbeddingCache(1 << 20))
    a = asm.add_request([Item(1, [(1, 4)])], 8)
    b = asm.add_request([Item(2, [(1, 4)])], 8)
    ids = asm.input_ids[:8]
    ids.zero_()
    first = asm.assemble([a], [0], [8], ids).clone()
    bad["on"] = True
    torch.cuda._sleep(SLEEP)
    with pytest.raises(RuntimeError, match="encoder failed"):
        asm.assemble([b], [0], [8], ids)
    bad["on"] = False
    again = asm.assemble([a], [0], [8], ids).clone()
    then_b = asm.assemble([b], [0], [8], ids).clone()
    torch.cuda.synchronize()
    assert torch.equal(first, again) and torch.equal(first[1:5], _rows(1)) and torch.equal(then_b[1:5], _rows(2))


def test_a_request_removed_between_plan_and_run_keeps_its_rows_until_the_step_ran():
    """The plan reads an encoded source only the Assembler holds; removing the request
    before ``run`` must not free it while the step's kernel is queued, or the memory is
    handed to the next allocation and the step reads whatever that wrote."""
    weight = torch.randn(20, H, device="cuda")
    asm = Assembler(weight=weight, max_tokens=64, max_requests=4,
                    encoders={"image": lambda items: [_rows(it.key) for it in items]})
    a = asm.add_request([Item(7, [(1, 4)])], 8)
    ids = torch.zeros(8, dtype=torch.long, device="cuda")
    torch.cuda._sleep(SLEEP)
    plan = asm.plan([a], [0], [8], ids)
    asm.remove_request(a)
    junk = [torch.full((4, H), -1.0, device="cuda") for _ in range(8)]  # would reuse freed blocks
    got = asm.run(plan)
    torch.cuda.synchronize()
    assert torch.equal(got[1:5], _rows(7)), got[1:5]
    del junk
