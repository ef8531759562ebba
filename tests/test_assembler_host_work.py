"""A steady-state step's host work does not grow with items or requests (calls counted)."""

from types import SimpleNamespace

import numpy as np
import torch

from mmassembler import Assembler, Item
from mmassembler.fill import PYTHON_FILL_MAX


from mmassembler.testing import count_calls  # noqa: E402  (the tests import it from here too)


def _steady_step_calls(num_requests: int, items_per_request: int, backend: str, device: str) -> int:
    hidden = 16
    weight = torch.randn(32, hidden, device=device)
    asm = Assembler(weight=weight, max_tokens=1 << 16, max_requests=num_requests,
                    max_items=num_requests * items_per_request, backend=backend)
    handles, prefix, extend = [], [], []
    for _ in range(num_requests):
        items = [Item(k, [(4 * k + 1, 4 * k + 2)], embedding=torch.randn(2, hidden, device=device))
                 for k in range(items_per_request)]
        handles.append(asm.add_request(items, prompt_len=4 * items_per_request + 1))
        prefix.append(0)
        extend.append(4 * items_per_request + 1)
    h, p, e = np.array(handles), np.array(prefix), np.array(extend)
    ids = torch.zeros(int(e.sum()), dtype=torch.int64, device=device)
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
    backend = "triton"
    one = _steady_step_calls(1, 1, backend, device)
    many_items = _steady_step_calls(1, 256, backend, device)
    python_max = _steady_step_calls(PYTHON_FILL_MAX, 1, backend, device)
    past = _steady_step_calls(PYTHON_FILL_MAX + 1, 1, backend, device)
    many_requests = _steady_step_calls(256, 1, backend, device)
    assert one == many_items == python_max, (one, many_items, python_max)
    assert past == many_requests, (past, many_requests)
