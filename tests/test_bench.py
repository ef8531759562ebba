"""The benchmark harness pieces that run on a CPU: scenarios, baselines, the JSON record."""

import json

import pytest
import torch

from bench.baselines import BASELINES
from bench.bench_assemble import verify
from bench.run import main as bench_main
from bench.scenarios import SUITES, build, scaled
from mmassembler import assemble

TINY = (1 / 128, 1 / 64)  # rows, hidden: every scenario's shape, a few kB of data


@pytest.mark.parametrize("suite,sc", [(s, sc) for s, scs in SUITES.items() for sc in scs],
                         ids=lambda v: v if isinstance(v, str) else v.name)
def test_scenarios_build_valid_batches(suite, sc):
    small = scaled(sc, *TINY)
    b = build(small, device="cpu", dtype=torch.float32)
    assert b.num_tokens == b.input_ids.shape[0] == sum(r.extend_len for r in b.requests) == b.out.shape[0]
    assert len(b.requests) == small.requests and all(len(r.items) == small.items for r in b.requests)
    lo = small.start if small.chunk else 0
    hi = min(small.prompt_len, lo + small.chunk) if small.chunk else small.prompt_len
    # placeholders hold out-of-vocabulary ids: their count is the multimodal rows
    assert int((b.input_ids >= b.weight.shape[0]).sum()) == b.num_mm_rows
    assert all(r.extend_len == hi - lo for r in b.requests)


@pytest.mark.parametrize("name", ["16x2x1296", "c8192@4000", "c2048@1500", "items 1024"])
def test_every_baseline_equals_the_reference(name):
    sc = next(sc for scs in SUITES.values() for sc in scs if name in sc.name)
    b = build(scaled(sc, *TINY), device="cpu", dtype=torch.bfloat16)
    ref = assemble(b.requests, b.input_ids, weight=b.weight, backend="torch")
    for fn in BASELINES.values():
        assert torch.equal(fn(b.requests, b.input_ids, b.weight), ref)
    assert verify(b)


def test_results_json_has_every_field(tmp_path, capsys):
    assert bench_main(["--suite", "kernel", "--scenario", "1x1x256", "--repeat", "2",
                       "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"device", "torch", "triton", "mmkernels", "dtype", "backend", "copy_bandwidth_Bps",
            "timestamp", "cpu_run"} <= set(data["meta"])
    (row,) = data["rows"]
    fields = {"suite", "scenario", "tokens", "mm_rows", "hidden", "items", "floor_fused_us",
              "floor_scatter_us", "wall_fused_us", "wall_scatter_us", "gpu_fused_us",
              "gpu_scatter_us", "wall_masked_scatter_us", "wall_index_copy_us",
              "gpu_masked_scatter_us", "host_planning_us", "fused_over_floor",
              "masked_scatter_over_ours", "index_copy_over_ours", "ratio_basis"}
    assert fields <= set(row)
    assert row["ratio_basis"] == "wall" and row["gpu_fused_us"] is None  # CPU run, labelled
    assert row["wall_fused_us"] > 0 and row["floor_fused_us"] > 0
    assert "1x1x256" in capsys.readouterr().out
