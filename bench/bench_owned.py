"""What the cache's ownership of encoder outputs costs: one copy per encoded item.

    python -m bench.bench_owned

An encoder's concatenated output is split per item and each part copied into a tensor
the library owns (``mmassembler.encode.owned``), as every encode step does. Reports GPU
time (events around the copies), wall (copies + synchronize) and the copy floor (bytes
read + written at the measured device-to-device bandwidth), in µs.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.harness import copy_bandwidth
from mmassembler.embeddings import owned

CASES = [(32, 1296, 3584), (32, 256, 3584), (64, 64, 4096), (256, 64, 4096)]  # items, rows, hidden


def main() -> int:
    dev = torch.device("cuda")
    bw = copy_bandwidth("cuda")
    import triton.testing

    print("| items x rows x hidden (bf16) | MB | floor µs | GPU µs | wall µs | µs per item (wall) |")
    print("|---|---:|---:|---:|---:|---:|")
    for items, rows, hidden in CASES:
        out = torch.randn(items * rows, hidden, device=dev, dtype=torch.bfloat16)
        parts = list(torch.split(out, rows))

        def copy_all():
            return [owned(p, dev) for p in parts]

        gpu = 1e3 * triton.testing.do_bench(copy_all, rep=200, return_mode="median")
        for _ in range(10):
            copy_all()
        samples = []
        for _ in range(100):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            copy_all()
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        wall = 1e6 * statistics.median(samples)
        nbytes = out.numel() * out.element_size()
        print(f"| {items} x {rows} x {hidden} | {nbytes / 1e6:.1f} | {2 * nbytes / bw * 1e6:.1f} | "
              f"{gpu:.1f} | {wall:.1f} | {wall / items:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
