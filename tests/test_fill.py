"""The two window fills (``mmassembler.fill``): the Python fill for a few windows and the
array fill past ``PYTHON_FILL_MAX`` serve one table. Held equal here over random
multi-step schedules (windows cut short by a token budget included) against the oracle,
and on bad steps: the same typed error, naming the same request, and nothing changed."""

import contextlib

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import mmassembler.core as core
from mmassembler import Assembler, AssemblyError, Item
from schedules import schedules
from test_assembler import run_schedule

FILLS = {"python": 1 << 30, "arrays": 0}  # PYTHON_FILL_MAX for each: every step takes that fill


@contextlib.contextmanager
def fill(name: str):
    saved = core.PYTHON_FILL_MAX
    core.PYTHON_FILL_MAX = FILLS[name]
    try:
        yield
    finally:
        core.PYTHON_FILL_MAX = saved


@pytest.mark.parametrize("name", list(FILLS))
@given(sched=schedules())
def test_each_fill_matches_the_oracle_over_schedules(device, name, sched):
    with fill(name):
        run_schedule(sched, "torch", device)


def _assembler(device):
    weight = torch.arange(20 * 8, dtype=torch.float32, device=device).reshape(20, 8)
    asm = Assembler(weight=weight, max_tokens=64, max_requests=6, backend="torch")
    handles = [asm.add_request([Item(10 + i, [(1, 3)], embedding=torch.full((3, 8), float(i), device=device))], 10)
               for i in range(4)]
    return asm, handles


@given(windows=st.lists(st.tuples(st.integers(-1, 6), st.integers(-2, 11), st.integers(-1, 11)),
                        min_size=1, max_size=6))
@example(windows=[(0, 0, 0), (1, 0, 0), (1, 0, 0), (0, 0, 0)])  # two repeats: both name window 2
def test_both_fills_refuse_a_bad_step_alike(device, windows):
    """Handles (unknown, repeated, removed), prefixes and lengths drawn at random: each
    fill raises the same error for the same request, or both give the same rows; after
    an error the next good step is right under either fill."""
    results = {}
    for name in FILLS:
        asm, handles = _assembler(device)
        asm.remove_request(handles[3])
        hl = [handles[h] if 0 <= h < 4 else h * 1000 + 7 for h, _, _ in windows]
        pl, el = [p for _, p, _ in windows], [e for _, _, e in windows]
        ids = torch.zeros(max(sum(e for e in el if e > 0), 0), dtype=torch.long, device=device)
        with fill(name):
            try:
                got = asm.assemble(hl, pl, el, ids[:sum(el)] if sum(el) >= 0 else ids).clone()
                results[name] = ("rows", got)
            except AssemblyError as err:
                results[name] = (type(err).__name__, err.request)
            good = asm.assemble([handles[0]], [0], [10], torch.zeros(10, dtype=torch.long, device=device))
        assert torch.equal(good[1:4], torch.zeros(3, 8, device=device))
    (ka, va), (kb, vb) = results["python"], results["arrays"]
    assert ka == kb, results
    assert torch.equal(va, vb) if ka == "rows" else va == vb, results


@given(chunks=st.lists(st.integers(1, 4), min_size=1, max_size=6))
def test_both_fills_let_go_of_passed_sources_alike(device, chunks):
    """Three requests walked in the same chunks: after every step each fill holds the same
    sources (one passed by its window is let go of at that step) and gives the same rows."""
    seen = {}
    for name in FILLS:
        asm, handles = _assembler(device)
        pos, trail = 0, []
        with fill(name):
            for c in chunks:
                c = min(c, 10 - pos)
                if c == 0:
                    break
                got = asm.assemble(handles[:3], [pos] * 3, [c] * 3, torch.zeros(3 * c, dtype=torch.long,
                                                                                 device=device))
                pos += c
                trail.append((got.clone(), asm.stats()["held_sources"]))
        seen[name] = trail
    assert len(seen["python"]) == len(seen["arrays"])
    for (ra, ha), (rb, hb) in zip(seen["python"], seen["arrays"]):
        assert torch.equal(ra, rb) and ha == hb, (ha, hb)
