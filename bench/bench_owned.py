"""What the cache's ownership of encoder outputs costs: one copy per encoder call.

    python -m bench.bench_owned

An encoder's per-item outputs are copied into one block the library owns
(``mmassembler.embeddings.own_block``: one ``torch.cat``, a launch per up to 128 inputs),
as every encode step does, beside one copy per item (the old way). Reports GPU time
(events around the copies), wall (copies + synchronize) and the copy floor (bytes read +
written at the measured device-to-device bandwidth), in µs. GPU only: on a CPU it says so
and exits.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.harness import copy_bandwidth
from mmassembler.embeddings import own_block

CASES = [(32, 1296, 3584), (32, 256, 3584), (64, 64, 4096), (256, 64, 4096)]  # items, rows, hidden


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.bench_owned times device copies: run it on a CUDA machine (no GPU here)")
        return 0
    dev = torch.device("cuda")
    bw = copy_bandwidth("cuda")
    import triton.testing

    print("| items x rows x hidden (bf16) | MB | floor µs | one block GPU µs | per item GPU µs | "
          "one block wall µs | per item wall µs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for items, rows, hidden in CASES:
        parts = [torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16) for _ in range(items)]
        nbytes = items * rows * hidden * 2
        block = lambda: own_block(parts, dev, (0, 0))  # noqa: E731
        each = lambda: [p.detach().to(device=dev, copy=True) for p in parts]  # noqa: E731
        gpu = [1e3 * triton.testing.do_bench(f, rep=100, return_mode="median") for f in (block, each)]
        wall = []
        for f in (block, each):
            samples = []
            for _ in range(50):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                f()
                torch.cuda.synchronize()
                samples.append(time.perf_counter() - t0)
            wall.append(1e6 * statistics.median(samples))
        print(f"| {items} x {rows} x {hidden} | {nbytes / 1e6:.1f} | {2 * nbytes / bw * 1e6:.1f} | "
              f"{gpu[0]:.1f} | {gpu[1]:.1f} | {wall[0]:.1f} | {wall[1]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
