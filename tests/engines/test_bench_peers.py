"""``python -m bench --peers`` builds the same batch for the engines' code and ours; on a
CPU every path's output must equal our reference bit for bit (the GPU run times them)."""

import pytest
import torch

from bench.bench_peers import calls
from bench.bench_resident import RESIDENT_SCENARIOS
from bench.scenarios import build, scaled
from mmassembler import assemble


@pytest.mark.parametrize("sc", [scaled(sc, 1 / 64, 1 / 64) for sc in RESIDENT_SCENARIOS[:3]] +
                         [scaled(RESIDENT_SCENARIOS[-2], 1 / 16, 1 / 64)], ids=lambda sc: sc.name)
def test_every_path_builds_the_same_embeddings(sg, vl, sc):
    b = build(sc, device="cpu", dtype=torch.float32, vocab=500)
    ref = assemble(b.requests, b.input_ids, weight=b.weight, backend="torch")
    with torch.no_grad():
        for name, fn in calls(sg, vl, b).items():
            for _ in range(2):  # the second call: steady state (caches warm, requests registered)
                assert torch.equal(fn(), ref), name
