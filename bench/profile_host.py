"""Where the host time of one ``assemble`` call goes, phase by phase (medians, µs).

    python -m bench.profile_host

Phases: plan (items ∩ chunks), sources (checks, cache/encode), metadata (the step
kernel's run and step tables), upload (pinned copy to the device, enqueue only), launch
(Triton's Python launcher, enqueue only), and the whole call with a synchronize.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.harness import host_time_us, wall_time_us
from bench.scenarios import PLANNING_256, SCENARIOS, build
from mmassembler import assemble, plan_batch
from mmassembler.encode import resolve_sources
from mmkernels.ops import anchors_on, prepare_launch, segment_tables


def profile(b) -> dict:
    dev, dtype, hidden, n = b.out.device, b.out.dtype, b.out.shape[1], b.out.shape[0]
    plan = plan_batch(b.requests)
    sources, info = resolve_sources(plan, encoders=None, cache=None, device=dev, dtype=dtype,
                                    widths=(hidden,))
    anchor_addr = np.array([t.data_ptr() for t in anchors_on(dev)], np.int64)
    meta = torch.from_numpy(segment_tables(plan.segments, info, anchor_addr, hidden, n))
    prepared = prepare_launch(b.out.clone(), None, sources, plan.segments, b.input_ids, b.weight,
                              info=info)
    row = dict(
        plan=host_time_us(lambda: plan_batch(b.requests)),
        sources=host_time_us(lambda: resolve_sources(plan, encoders=None, cache=None, device=dev,
                                                     dtype=dtype, widths=(hidden,))),
        metadata=host_time_us(lambda: segment_tables(plan.segments, info, anchor_addr, hidden, n)),
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
