"""Call overhead: eager ``mmkernels.embed_and_gather`` vs the ``torch.ops.mmkernels`` custom op.

    python -m bench.bench_custom_op

A small batch (one 256-row image in 512 tokens, hidden 2048, bf16), so the host path
dominates; medians of host time per call (enqueue only) and of wall time with a sync.
"""

from __future__ import annotations

import torch

import mmkernels
from bench.harness import host_time_us, wall_time_us


def main(argv=None) -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(32000, 2048, generator=g).to(dev, torch.bfloat16)
    ids = torch.randint(0, 32000, (512,), generator=g).to(dev)
    image = torch.randn(256, 2048, generator=g).to(dev, torch.bfloat16)
    segments = torch.tensor([[0, 0, 100, 256]])

    def eager():
        return mmkernels.embed_and_gather(ids, weight, [image], segments)

    def custom_op():
        return torch.ops.mmkernels.embed_and_gather(ids, weight, [image], segments, None)

    assert torch.equal(eager(), custom_op())
    print(f"{'path':12s} {'host µs':>10s} {'wall µs':>10s}   ({'CPU run' if dev == 'cpu' else dev})")
    for name, fn in (("eager", eager), ("custom op", custom_op)):
        with torch.inference_mode():
            host = host_time_us(fn, repeat=2000, warmup=200)
            wall = wall_time_us(fn, repeat=500, device=dev)
        print(f"{name:12s} {host:10.1f} {wall:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
