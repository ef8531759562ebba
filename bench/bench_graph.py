"""CUDA-graph mode vs the plain launch: GPU time of the kernel and wall time of a step.

    python -m bench.bench_graph

GPU time: CUDA-graph replay of each launch alone (the graph-mode kernel runs the grid of
its capacity and reads counts on the device, and uses the unaligned variant). Wall time:
``assemble`` + sync, against ``GraphAssembler.prepare`` + ``graph.replay()`` + sync.
"""

from __future__ import annotations

import torch

from bench.bench_assemble import prepared
from bench.harness import gpu_time_us, wall_time_us
from bench.scenarios import SCENARIOS, build
from mmassembler import GraphAssembler, assemble


def main() -> int:
    print(f"{'scenario':32s} {'gpu plain':>10s} {'gpu graph':>10s} {'wall plain':>11s} {'wall graph':>11s}")
    for sc in (SCENARIOS[0], SCENARIOS[3], SCENARIOS[4]):
        b = build(sc)
        ga = GraphAssembler(max_tokens=b.num_tokens + 1024, max_segments=4 * sum(
            len(r.items) for r in b.requests) + 2 * len(b.requests) + 8, weight=b.weight)
        ga.prepare(b.requests, b.input_ids)
        ga.launch()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ga.launch()
        graph.replay()
        torch.cuda.synchronize()
        want = assemble(b.requests, b.input_ids, weight=b.weight, backend="torch")
        assert torch.equal(ga.out[:b.num_tokens], want)

        def step():
            ga.prepare(b.requests, b.input_ids)
            graph.replay()

        row = (gpu_time_us(prepared(b, "fused").run), gpu_time_us(ga.launch),
               wall_time_us(lambda: assemble(b.requests, b.input_ids, weight=b.weight)),
               wall_time_us(step))
        print(f"{sc.name:32s} " + " ".join(f"{v:10.1f}" for v in row))
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
