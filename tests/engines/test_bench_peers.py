"""``python -m bench --peers`` and ``--trace`` run the same steps through the engines' code
and every path of ours; on a CPU each path's output must equal the reference bit for bit
in every mode (the GPU run times them)."""

import pytest
import torch

from bench.bench_peers import _leaves, workload
from bench.bench_resident import RESIDENT_SCENARIOS
from bench.bench_trace import make_requests, schedule
from bench.scenarios import build, scaled
from bench.serving import drivers, run_steps


@pytest.mark.parametrize("sc", [scaled(sc, 1 / 64, 1 / 64) for sc in RESIDENT_SCENARIOS[:3]] +
                         [scaled(RESIDENT_SCENARIOS[-2], 1 / 16, 1 / 64)], ids=lambda sc: sc.name)
def test_every_path_gives_the_reference_in_every_mode(sg, vl, sc):
    b = build(sc, device="cpu", dtype=torch.float32, vocab=500)
    reqs, windows, walk = workload(b)
    with torch.no_grad():
        for name, drv in drivers(reqs, b.weight, sg, vl):
            for _ in range(2):  # first contact twice: the second also removes the first's requests
                run_steps(drv, reqs, [windows], b.weight, check=True, sync=lambda: None, leave=[list(reqs)])
            run_steps(drv, reqs, walk, b.weight, check=True, sync=lambda: None, leave=_leaves(walk))
            run_steps(drv, reqs, [windows] * 2, b.weight, check=True, sync=lambda: None)  # steady
            drv.close()


def test_trace_paths_give_the_reference_at_every_step(sg, vl):
    reqs, weight = make_requests(24, 16, "cpu", seed=3, shrink=16)
    steps, leave = schedule(reqs, rate=3.0, budget=256, seed=3)
    assert len(steps) > 3 and any(len(w) > 1 for w in steps)
    with torch.no_grad():
        for name, drv in drivers(reqs, weight, sg, vl, ["sglang_routine", "ours_sglang_routine", "vllm",
                                                        "ours_vllm", "assembler", "stateless", "plugin_sglang_routine",
                                                        "plugin_vllm"]):
            run_steps(drv, reqs, steps, weight, check=True, sync=lambda: None, leave=leave)
            drv.close()
