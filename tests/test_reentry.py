"""A call made from inside another on the same thread (an encoder that assembles): the
stateless ``assemble`` nested in an encoder works on tables of its own; a re-entered
``Assembler`` is a typed ``ReentrantCallError``, raised before anything changes."""

import threading

import pytest
import torch

from mmassembler import Assembler, EmbeddingCache, Item, ReentrantCallError, Request, assemble

H = 8


def _in_thread(fn, seconds=60.0):
    """Run ``fn`` in a thread; its result, or a failure when it does not return in time (a
    deadlock fails the test instead of hanging it)."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the nested call did not return (deadlock)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_stateless_assemble_nested_in_an_encoder_works(device):
    weight = torch.randn(10, H, device=device)
    inner_rows = torch.randn(2, H, device=device)

    def encoder(items):  # a nested model: its own embedding assembled by the library
        inner = assemble([Request([Item(7, [(1, 2)], embedding=inner_rows)], 0, 4)],
                         torch.zeros(4, dtype=torch.long, device=device), weight=weight)
        return [inner[:3] for _ in items]

    ids = torch.zeros(6, dtype=torch.long, device=device)
    req = Request([Item(1, [(2, 4)])], 0, 6)
    got = _in_thread(lambda: assemble([req], ids, weight=weight, encoders={"image": encoder},
                                      cache=EmbeddingCache(1 << 20)))
    inner = torch.cat([weight[:1], inner_rows, weight[:1]])
    assert torch.equal(got[2:5], inner[:3]) and torch.equal(got[:2], weight[[0, 0]])


@pytest.mark.parametrize("call", ["assemble", "plan", "add_requests", "remove_requests"])
def test_an_assembler_reentered_from_its_encoder_raises_and_changes_nothing(device, call):
    weight = torch.randn(10, H, device=device)
    cache = EmbeddingCache(1 << 20)
    holder = {}

    def encoder(items):
        asm, h = holder["asm"], holder["h"]
        ids = torch.zeros(6, dtype=torch.long, device=device)
        {"assemble": lambda: asm.assemble([h], [0], [6], ids),
         "plan": lambda: asm.plan([h], [0], [6], ids),
         "add_requests": lambda: asm.add_requests([([], 4)]),
         "remove_requests": lambda: asm.remove_requests([h])}[call]()
        return [torch.randn(3, H, device=device) for _ in items]

    asm = Assembler(weight=weight, max_tokens=64, max_requests=4, encoders={"image": encoder}, cache=cache)
    h = asm.add_request([Item(1, [(2, 4)])], 6)
    holder.update(asm=asm, h=h)
    before = asm.registry.snapshot()
    ids = torch.zeros(6, dtype=torch.long, device=device)
    with pytest.raises(ReentrantCallError, match=f"Assembler.{call} called from inside Assembler.assemble"):
        _in_thread(lambda: asm.assemble([h], [0], [6], ids))
    assert asm.registry.snapshot() == before and len(cache) == 0 and len(asm) == 1
    holder["asm"] = None  # the Assembler still works for a well-behaved encoder
    asm2 = Assembler(weight=weight, max_tokens=64, max_requests=4,
                     encoders={"image": lambda items: [torch.ones(3, H, device=device) for _ in items]})
    h2 = asm2.add_request([Item(1, [(2, 4)])], 6)
    assert torch.equal(asm2.assemble([h2], [0], [6], ids)[2:5], torch.ones(3, H, device=device))


def test_another_thread_waits_instead_of_raising(device):
    """Only the same thread re-entering is refused: two threads share an Assembler."""
    weight = torch.randn(10, H, device=device)
    asm = Assembler(weight=weight, max_tokens=64, max_requests=8)
    ids = torch.zeros(6, dtype=torch.long, device=device)
    errors = []

    def worker(k):
        try:
            for _ in range(20):
                h = asm.add_request([Item(k, [(1, 2)], embedding=torch.full((2, H), float(k), device=device))], 6)
                out = asm.assemble([h], [0], [6], ids)
                assert torch.equal(out[1:3], torch.full((2, H), float(k), device=device))
                asm.remove_request(h)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
