"""First contact at array speed: a request's whole life (register, the step that first
reaches its items, remove) costs a few Python calls per item and no kernel launch per item;
a bad item among many new ones changes nothing; an encoder that reuses its buffer is
copied once per call."""

import os

import numpy as np
import pytest
import torch

import mmassembler.core as core
from mmassembler import Assembler, EmbeddingCache, EmbeddingFormatError, Item, Request, RowCountError, assemble
from mmassembler.testing import count_calls
from mmkernels.step_op import StepOp

H, ROWS = 16, 4


def _lives(r, k, encoded, stateless):
    pool = [torch.randn(ROWS, H) for _ in range(r * k)]
    enc = {"image": lambda items: [it.data for it in items]} if encoded else None
    weight = torch.randn(50, H)
    step = k * (ROWS + 2) + 2
    ids = torch.zeros(r * step, dtype=torch.int64)
    asm = Assembler(weight=weight, max_tokens=r * step, max_requests=r, max_items=r * k + 4, encoders=enc, backend=os.environ.get("B", "triton"),
                    cache=EmbeddingCache(1 << 26) if encoded else None)
    cache = EmbeddingCache(1 << 26) if encoded else None
    keys = iter(range(1, 1 << 40))
    p, e = np.zeros(r, np.int64), np.full(r, step, np.int64)

    def life():
        reqs = [([Item(next(keys), [(2 + j * (ROWS + 2), 1 + j * (ROWS + 2) + ROWS)],
                       embedding=None if encoded else pool[i * k + j], data=pool[i * k + j]) for j in range(k)],
                 step) for i in range(r)]
        if stateless:
            rq = [Request(items, 0, step, n) for items, n in reqs]
            return lambda: assemble(rq, ids, weight=weight, encoders=enc, cache=cache, backend="triton")

        def run():
            h = asm.add_requests(reqs)
            asm.assemble(h, p, e, ids)
            asm.remove_requests(h)
        return run

    return life


@pytest.mark.parametrize("shape", ["1x256", "256x1", "64x4"])
@pytest.mark.parametrize("encoded", [False, True], ids=["precomputed", "encoded"])
@pytest.mark.parametrize("stateless", [False, True], ids=["assembler", "stateless"])
def test_python_calls_per_new_item(monkeypatch, shape, encoded, stateless):
    """At most 12 calls per precomputed and 16 per encoded item for a whole life (the torch
    twin and the launch stubbed out: they are the CPU fallback and one call a step)."""
    monkeypatch.setattr(core, "assemble_step_ref", lambda out, *a, **kw: out)
    monkeypatch.setattr(StepOp, "launch", lambda *a, **kw: None)
    r, k = map(int, shape.split("x"))
    life = _lives(r, k, encoded, stateless)
    for _ in range(2):
        life()()
    per_item = count_calls(life()) / (r * k)
    assert per_item <= (16 if encoded else 12), per_item


def test_one_copy_launch_per_encoder_call(monkeypatch):
    """Outputs the library owns are copied as one block per encoder call, not per item."""
    import mmassembler.encode as encode

    copies = []
    real = encode.own_block
    monkeypatch.setattr(encode, "own_block", lambda parts, *a: copies.append(len(parts)) or real(parts, *a))
    calls = []

    def encoder(items):
        calls.append(len(items))
        return [torch.full((ROWS, H), float(it.key)) for it in items]

    asm = Assembler(weight=torch.zeros(3, H), max_tokens=512, max_requests=16, encoders={"image": encoder},
                    cache=EmbeddingCache(1 << 20))
    h = asm.add_requests([([Item(10 * i + j, [(j * 6, j * 6 + ROWS - 1)]) for j in range(4)], 24) for i in range(8)])
    out = asm.assemble(h, [0] * 8, [24] * 8, torch.zeros(8 * 24, dtype=torch.long))
    assert calls == [32] and copies == [32]
    assert torch.equal(out[6:10], torch.full((ROWS, H), 1.0))


@pytest.mark.parametrize("bad", ["rows", "dtype"])
@pytest.mark.parametrize("path", ["assembler", "stateless"])
def test_a_bad_item_among_many_new_ones_changes_nothing(bad, path):
    """A bad item among 64 new requests: a typed error naming it, raised before any write;
    output, tables and cache as they were, and the other requests work in the next step."""
    cache = EmbeddingCache(1 << 20)
    enc = {"image": lambda items: [torch.randn(ROWS, H) for _ in items]}
    weight = torch.randn(5, H)
    good = [[Item(1000 + i, [(1, ROWS)])] for i in range(64)]
    wrong = torch.randn(ROWS + 1, H) if bad == "rows" else torch.zeros(ROWS, H, dtype=torch.int32)
    items = [list(x) for x in good]
    items[37] = [Item(77, [(1, ROWS)], embedding=wrong)]
    ids = torch.zeros(64 * 8, dtype=torch.long)
    out = torch.full((64 * 8, H), 3.0)
    err = RowCountError if bad == "rows" else EmbeddingFormatError
    if path == "stateless":
        with pytest.raises(err) as info:
            assemble([Request(x, 0, 8) for x in items], ids, out=out, encoders=enc, cache=cache)
        assert info.value.request == 37 and info.value.item_key == 77
        assert torch.equal(out, torch.full((64 * 8, H), 3.0)) and len(cache) == 0
        got = assemble([Request(x, 0, 8) for x in good], ids, weight=weight, encoders=enc, cache=cache)
        assert got.shape == (64 * 8, H)
        return
    asm = Assembler(weight=weight, max_tokens=64 * 8, max_requests=64, encoders=enc, cache=cache)
    h = asm.add_requests([(x, 8) for x in items])
    before = (asm.registry.snapshot(), len(cache))
    with pytest.raises(err) as info:
        asm.assemble(h, [0] * 64, [8] * 64, ids, out=out)
    assert info.value.request == 37 and info.value.item_key == 77
    assert torch.equal(out, torch.full((64 * 8, H), 3.0))
    assert (asm.registry.snapshot(), len(cache)) == before
    others = [x for i, x in enumerate(h) if i != 37]
    got = asm.assemble(others, [0] * 63, [8] * 63, ids[:63 * 8])
    assert got.shape == (63 * 8, H) and len(cache) == 63
