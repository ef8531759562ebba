"""Measurement pieces: the copy floor, GPU time of device work alone, synchronized wall time.

GPU time: the device work (no host planning) captured in a CUDA graph and replayed
(``triton.testing.do_bench_cudagraph``, median), so launch gaps do not count.
Wall time: the whole call -- host planning, metadata copy, launch, kernel -- followed by a
synchronize, median over repeats after warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from mmkernels.step_op import StepConfig, StepOp


def gpu_time_us(fn: Callable[[], object], rep_ms: int = 200, capturable: bool = True) -> float:
    """Median GPU time of ``fn``'s device work, from CUDA-graph replays (µs); events around
    eager calls for ``fn`` that cannot be captured (a failed capture can leave the context
    unusable, so such calls must say so rather than rely on the fallback)."""
    import triton.testing

    if not capturable:
        return 1e3 * triton.testing.do_bench(fn, rep=rep_ms, return_mode="median")
    try:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    except Exception:  # noqa: BLE001 - an op that cannot be captured: events around eager calls
        return 1e3 * triton.testing.do_bench(fn, rep=rep_ms, return_mode="median")


def wall_time_us(fn: Callable[[], object], repeat: int = 100, warmup: int = 10,
                 device: str = "cuda") -> float:
    """Median wall time of ``fn`` + synchronize (µs)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(samples)


def host_time_us(fn: Callable[[], object], repeat: int = 200, warmup: int = 20) -> float:
    """Median host time of ``fn`` with no synchronisation (µs)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(samples)


def copy_bandwidth(device: str = "cuda", nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written.

    1 GiB on a GPU (many times its L2); 64 MiB on a CPU, where a run must stay short.
    """
    nbytes = nbytes or (1 << 30 if device == "cuda" else 1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    if device != "cuda":
        t = host_time_us(lambda: dst.copy_(src), repeat=5, warmup=1) / 1e6
        return 2 * nbytes / t
    import triton.testing

    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=300, return_mode="median")
    return 2 * nbytes / (ms / 1e3)


def prepared(b, mode: str, config: StepConfig | None = None):
    """The step kernel over ``b``'s tables with every host step done and the tables on the
    device: the returned call is the launch alone (what GPU time measures; the same
    tables and kernel serve the ``Assembler`` and the stateless call)."""
    import numpy as np

    from mmassembler import Assembler

    fused = mode == "fused"
    dev = b.out.device
    n_items = sum(len(r.items) for r in b.requests)
    asm = Assembler(weight=b.weight if fused else None, hidden=b.weight.shape[1], dtype=b.weight.dtype,
                    device=dev, max_tokens=max(1, b.num_tokens), max_requests=max(1, len(b.requests)),
                    max_items=max(1, n_items), max_runs=max(1, 4 * n_items))
    h = np.array(asm.add_requests([(r.items, r.prompt_len) for r in b.requests]))
    out = b.out.clone()
    asm.assemble(h, [r.prefix_len for r in b.requests], [r.extend_len for r in b.requests], b.input_ids,
                 **({} if fused else {"out": out}))
    op = asm._op if config is None else StepOp(asm.tables, hidden=asm.hidden, ds_cols=0, dtype=asm.dtype,
                                                 fused=fused, interpreted=False, config=config)
    ids, weight = (b.input_ids, b.weight) if fused else (None, None)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)

    def launch():
        op.launch(out, None, ids, weight, b.num_tokens)

    launch.asm = asm  # keeps the tables and held sources alive
    return launch
