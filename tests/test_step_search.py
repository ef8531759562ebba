"""The step kernel's searches past one load round: requests with more runs, and steps
with more requests, than ``SEARCH_W`` keys (its ``SEARCH_W``-ary narrowing), ≡ the oracle."""

import pytest
import torch

from kernel_utils import assert_bitwise_equal
from mmassembler import Assembler, Item, Request, assemble_oracle
from mmkernels.step_op import StepConfig

H = 8
SEARCH_W = StepConfig(1, 1, 1).search_keys  # the kernel's keys per search round


def _check(device, requests, windows, block_rows=None):
    weight = torch.randn(50, H, device=device)
    asm = Assembler(weight=weight, max_tokens=sum(e for _, e in windows), max_requests=len(requests),
                    max_items=sum(len(r[0]) for r in requests) + 1, backend="triton",
                    block_rows=block_rows)
    handles = asm.add_requests(requests)
    n = sum(e for _, e in windows)
    ids = torch.randint(0, 50, (n,), device=device)
    got = asm.assemble(handles, [p for p, _ in windows], [e for _, e in windows], ids)
    reqs = [Request(items, p, e) for (items, _), (p, e) in zip(requests, windows)]
    want, _ = assemble_oracle(reqs, ids.cpu(), lambda it: it.embedding.cpu(), weight=weight.cpu())
    assert_bitwise_equal(got.cpu(), want)


@pytest.mark.parametrize("runs", [SEARCH_W - 1, SEARCH_W + 1, SEARCH_W * SEARCH_W + 5])
@pytest.mark.parametrize("start", [0, 7, 151])
def test_request_with_more_runs_than_one_search_round(device, runs, start):
    """One request, ``runs`` one-row items at every other position; windows starting
    before, inside and between runs."""
    items = [Item(k, [(2 * k + 1, 2 * k + 1)], embedding=torch.randn(1, H, device=device))
             for k in range(runs)]
    prompt = 2 * runs + 3
    start = min(start, prompt - 1)
    _check(device, [(items, prompt)], [(start, prompt - start)])


@pytest.mark.parametrize("count", [SEARCH_W + 1, SEARCH_W * SEARCH_W + 3])
def test_step_with_more_requests_than_one_search_round(device, count):
    """``count`` requests, some with empty windows (equal output bases), each with one item."""
    requests, windows = [], []
    for k in range(count):
        items = [Item(1000 + k, [(1, 2)], embedding=torch.randn(2, H, device=device))]
        requests.append((items, 4))
        windows.append((k % 3, 0 if k % 5 == 0 else 4 - k % 3))
    _check(device, requests, windows, block_rows=1)
