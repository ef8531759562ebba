"""What a step costs the host, counted (never timed): numpy operations and Python calls
through the public API, for a request's whole life (registered, the step that first
reaches it, removed), a step like the serving trace's, and the steady step.

The kernel launch is stubbed where it would run in Python (the interpreter): what is
counted is the host work a GPU step makes. Counts use ``mmassembler.counting``.
"""

import gc
from types import SimpleNamespace

import pytest
import torch
from stand_ins import Feature, PlaceholderRange, RunnerRequest, SgInputs, sg_item
from torch import nn

from mmassembler import Assembler, EmbeddingCache, Item, Request, assemble
from mmassembler.counting import count_calls, count_numpy, numpy_counting_supported
from mmassembler.engines import sglang, vllm
from mmassembler.fill import PYTHON_FILL_MAX
from mmkernels.step_op import StepOp

H, ROWS = 16, 256
pytestmark = pytest.mark.skipif(not numpy_counting_supported(), reason="numpy counting needs CPython 3.11/3.12")


@pytest.fixture
def no_launch(monkeypatch, device):
    """The launch stubbed on the CPU, where the interpreter would run the kernel in Python."""
    if device == "cpu":
        monkeypatch.setattr(StepOp, "launch", lambda *a, **kw: None)


def _image(key, rows=ROWS, start=10, encoded=False, device="cpu"):
    t = torch.randn(rows, H, device=device)
    return Item(key, [(start, start + rows - 1)], embedding=None if encoded else t, data=t)


def _lives(path: str, encoded: bool, device: str):
    """A function making one new request's whole life through ``path``."""
    weight = torch.randn(50, H, device=device)
    embed = nn.Embedding.from_pretrained(weight)
    enc = {"image": lambda items: [it.data for it in items]}
    cache = EmbeddingCache(1 << 28)
    keys = iter(range(1, 1 << 40))
    n = ROWS + 20
    ids = torch.zeros(n, dtype=torch.int64, device=device)
    if path == "assembler":
        asm = Assembler(weight=weight, max_tokens=4096, max_requests=64, encoders=enc, cache=cache, backend="triton")

        def life():
            h = asm.add_requests([([_image(next(keys), encoded=encoded, device=device)], n)])
            asm.assemble(h, [0], [n], ids)
            asm.remove_requests(h)
        return life
    if path == "stateless":
        return lambda: assemble([Request([_image(next(keys), encoded=encoded, device=device)], 0, n, n)], ids,
                                weight=weight, encoders=enc, cache=cache, backend="triton")
    if path == "vllm":  # the runner's encoder cache holds the outputs: read in place
        outputs = {}

        def life():
            k = f"f{next(keys)}"
            outputs[k] = torch.randn(ROWS, H, device=device)
            req = RunnerRequest(0, n, [Feature(k, PlaceholderRange(10, ROWS))])
            vllm.gather_mm_embeddings([req], outputs, ids, embed_tokens=embed, backend="triton",
                                      max_tokens=4096, max_requests=64)
            del outputs[k]
        return life

    def life():  # sglang: a request admitted, read in one chunk, dropped (removed at the next step)
        t = torch.randn(ROWS, H, device=device)
        item = sg_item(next(keys), [(10, 10 + ROWS - 1)], precomputed_embeddings=None if encoded else t, feature=t)
        sglang.embed_mm_inputs([SgInputs([item])], [0], [n], ids, embed,
                               data_embedding_func_mapping={"image": lambda its: [i.feature for i in its]},
                               cache=cache, backend="triton", max_tokens=4096, max_requests=64)
    return life


LIVES = [("assembler", False), ("assembler", True), ("stateless", False), ("stateless", True), ("vllm", False),
         ("sglang", False), ("sglang", True)]


@pytest.mark.parametrize("path,encoded", LIVES, ids=[f"{p}-{'encoded' if e else 'precomputed'}" for p, e in LIVES])
def test_a_one_request_life_makes_at_most_twenty_numpy_operations(no_launch, device, path, encoded):
    """At most 20 numpy operations for a one-request life (24 when encoded)."""
    life = _lives(path, encoded, device)
    with torch.no_grad():
        for _ in range(3):
            life()
        log = []
        ops = count_numpy(life, log=log)
    assert ops <= (24 if encoded else 20), log


def _trace_like_step(device):
    """An Assembler holding one request mid-prompt and four finished ones; the step removes
    the four, registers six new requests of 17 items, and assembles seven windows."""
    weight = torch.randn(50, H, device=device)
    asm = Assembler(weight=weight, max_tokens=8192, max_requests=64, backend="triton")
    keys = iter(range(1, 1 << 40))

    def request(k_items, rows=64):
        items = [_image(next(keys), rows, start=8 + j * (rows + 8), device=device) for j in range(k_items)]
        return items, 8 + k_items * (rows + 8)
    ongoing = request(4)
    finished = [request(2) for _ in range(4)]
    hs = asm.add_requests([ongoing] + finished)
    ongoing_h, done = hs[0], hs[1:]
    ids = torch.zeros(8192, dtype=torch.int64, device=device)
    asm.assemble(hs, [0] * 5, [100, *[n for _, n in finished]], ids[:100 + sum(n for _, n in finished)])
    new = [request(k) for k in (1, 2, 3, 3, 4, 4)]

    def step():
        asm.remove_requests(done)
        h = asm.add_requests(new)
        e = [ongoing[1] - 100] + [n for _, n in new]
        asm.assemble([ongoing_h] + h, [100] + [0] * 6, e, ids[:sum(e)])
    return step


def test_a_trace_like_step_makes_at_most_thirty_numpy_operations(no_launch, device):
    step = _trace_like_step(device)
    log = []
    with torch.no_grad():
        ops = count_numpy(step, log=log)
    assert ops <= 30, log


@pytest.mark.parametrize("encoded", [False, True], ids=["precomputed", "encoded"])
def test_python_calls_of_a_life_grow_by_at_most_three_an_item(no_launch, device, encoded):
    """The per-item slope of a request's life (1 against 65 items of one request) is at
    most three calls; the fixed part stays bounded (see the README for where it goes)."""
    weight = torch.randn(50, H, device=device)
    enc = {"image": lambda items: [it.data for it in items]}
    asm = Assembler(weight=weight, max_tokens=1 << 16, max_requests=4, max_items=256, encoders=enc,
                    cache=EmbeddingCache(1 << 28), backend="triton")
    keys = iter(range(1, 1 << 40))

    def life(k):  # the items are made before the count starts
        items = [_image(next(keys), 8, start=1 + 10 * j, encoded=encoded, device=device) for j in range(k)]
        n = 10 * k + 1
        ids = torch.zeros(n, dtype=torch.int64, device=device)

        def run():
            h = asm.add_requests([(items, n)])
            asm.assemble(h, [0], [n], ids)
            asm.remove_requests(h)
        return run

    counts = {}
    for k in (1, 65):
        life(k)()
        run = life(k)
        gc.collect()  # no weak-reference callback of an earlier test's objects lands in the count
        gc.disable()
        try:
            counts[k] = count_calls(run)
        finally:
            gc.enable()
    slope = (counts[65] - counts[1]) / 64
    assert slope <= 3, counts
    assert counts[1] <= (240 if encoded else 150), counts


def _steady_step_calls(num_requests: int, items_per_request: int, device: str) -> int:
    weight = torch.randn(32, H, device=device)
    asm = Assembler(weight=weight, max_tokens=1 << 16, max_requests=num_requests,
                    max_items=num_requests * items_per_request, backend="triton")
    items = [[Item(k, [(4 * k + 1, 4 * k + 2)], embedding=torch.randn(2, H, device=device))
              for k in range(items_per_request)] for _ in range(num_requests)]
    n = 4 * items_per_request + 1
    h = asm.add_requests([(x, n) for x in items])
    p, e = [0] * num_requests, [n] * num_requests
    ids = torch.zeros(n * num_requests, dtype=torch.int64, device=device)
    asm.assemble(h, p, e, ids)  # first step: every item gets its source
    asm.assemble(h, p, e, ids)  # warm: on a GPU the kernel is compiled and then launched directly
    if asm.backend == "interpreter":  # the interpreter runs the kernel itself in Python
        asm._op.launcher = SimpleNamespace(launch_direct=lambda *args: True)
    calls = count_calls(lambda: asm.assemble(h, p, e, ids))
    if asm.backend == "triton":
        assert asm._op.launcher.direct_launches >= 2  # Triton's dispatcher was skipped
    return calls


def test_steady_step_calls_do_not_grow_with_items_or_requests(device):
    """Each fill makes a fixed number of calls whatever the items and windows: the Python
    fill up to ``PYTHON_FILL_MAX`` windows, the array fill past it."""
    one = _steady_step_calls(1, 1, device)
    many_items = _steady_step_calls(1, 256, device)
    python_max = _steady_step_calls(PYTHON_FILL_MAX, 1, device)
    past = _steady_step_calls(PYTHON_FILL_MAX + 1, 1, device)
    many_requests = _steady_step_calls(256, 1, device)
    assert one == many_items == python_max, (one, many_items, python_max)
    assert past == many_requests, (past, many_requests)


def test_a_steady_step_makes_no_numpy_operation_with_few_windows(device):
    weight = torch.randn(32, H, device=device)
    asm = Assembler(weight=weight, max_tokens=1 << 12, max_requests=4, backend="triton")
    h = asm.add_requests([([Item(1, [(1, 8)], embedding=torch.randn(8, H, device=device))], 20)])
    ids = torch.zeros(20, dtype=torch.int64, device=device)
    asm.assemble(h, [0], [20], ids)
    if asm.backend == "interpreter":
        asm._op.launcher = SimpleNamespace(launch_direct=lambda *args: True)
    log = []
    assert count_numpy(lambda: asm.assemble(h, [0], [20], ids), log=log) == 0, log
