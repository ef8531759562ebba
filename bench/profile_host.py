"""Where the host time of one ``assemble`` call goes, phase by phase (medians, µs).

    python -m bench.profile_host

Phases: plan (the requests' reached runs and step table), sources (checks, cache/encode),
metadata (the step kernel's device run rows beside the step table), upload (pinned copy to the device, enqueue only), launch
(Triton's Python launcher, enqueue only), and the whole call with a synchronize.
"""

from __future__ import annotations

import torch

from bench.harness import host_time_us, wall_time_us
from bench.scenarios import PLANNING_256, SCENARIOS, build
from mmassembler import assemble
from mmassembler.request_step import request_step, step_sources
from mmkernels.ops import prepare_launch, step_tables


def profile(b) -> dict:
    dev, dtype, hidden, n = b.out.device, b.out.dtype, b.out.shape[1], b.out.shape[0]
    step = request_step(b.requests)
    sources, entries = step_sources(step, encoders=None, cache=None, device=dev, widths=(hidden,))
    table = step_tables(step.runs, step.table, entries)
    meta = torch.from_numpy(table)
    prepared = prepare_launch(b.out.clone(), None, sources, table, len(step.runs), b.input_ids,
                              b.weight)
    row = dict(
        plan=host_time_us(lambda: request_step(b.requests)),
        sources=host_time_us(lambda: step_sources(step, encoders=None, cache=None, device=dev,
                                                  widths=(hidden,))),
        metadata=host_time_us(lambda: step_tables(step.runs, step.table, entries)),
        upload=host_time_us(lambda: meta.pin_memory().to(dev, non_blocking=True)),
        launch=host_time_us(prepared.run),
        wall=wall_time_us(lambda: assemble(b.requests, b.input_ids, weight=b.weight)),
        empty_torch_op=host_time_us(lambda: torch.empty(n, hidden, device=dev, dtype=dtype)),
    )
    torch.cuda.synchronize()
    return row


def main() -> int:
    print(f"{'scenario':32s}" + "".join(f"{k:>10s}" for k in
                                       ("plan", "sources", "metadata", "upload", "launch", "empty", "wall")))
    for sc in (SCENARIOS[4], SCENARIOS[3], SCENARIOS[0], PLANNING_256):
        b = build(sc)
        r = profile(b)
        print(f"{sc.name:32s}" + "".join(f"{r[k]:10.1f}" for k in
                                           ("plan", "sources", "metadata", "upload", "launch",
                                            "empty_torch_op", "wall")))
        del b
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
