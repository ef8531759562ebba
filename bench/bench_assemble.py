"""Ours (fused, scatter) vs the engines' usual paths vs the copy floor, per scenario.

Measurement pieces for ``python -m bench`` (bench/run.py); ``python -m bench.bench_assemble``
runs the kernel scenarios.

The floor is the bytes a mode must move over the measured device-to-device copy bandwidth:
fused mode reads and writes N x H (every output row), scatter mode M x H (multimodal rows).
"""

from __future__ import annotations

import torch

import mmkernels
from bench.baselines import BASELINES
from bench.harness import gpu_time_us, host_time_us, prepared, wall_time_us
from bench.scenarios import Built
from mmassembler import Item, Request, assemble


def host_planning_us(b: Built, fresh_requests: bool = False) -> float:
    """Host time of the stateless ``assemble`` on the torch backend with its reference
    copy stubbed out: registration, windows, sources and tables (µs). Requests are reused,
    or with ``fresh_requests`` rebuilt over new ``Item`` objects every call."""
    import mmassembler.core as core

    items = [[Item(it.key, it.spans, it.modality, it.embedding, it.data, it.embed_mask) for it in r.items]
             for r in b.requests]

    def host_only():
        reqs = b.requests
        if fresh_requests:
            reqs = [Request([Item(it.key, it.spans, it.modality, it.embedding, it.data, it.embed_mask)
                             for it in its], r.prefix_len, r.extend_len, r.prompt_len)
                    for its, r in zip(items, b.requests)]
        assemble(reqs, None, out=b.out, backend="torch")

    real = core.assemble_step_ref
    core.assemble_step_ref = lambda out, *a: out
    try:
        return host_time_us(host_only)
    finally:
        core.assemble_step_ref = real


def verify(b: Built, backend: str = "auto") -> bool:
    """One-shot equality of every provider against the torch reference before timing."""
    ref = assemble(b.requests, b.input_ids, weight=b.weight, backend="torch")
    ok = torch.equal(assemble(b.requests, b.input_ids, weight=b.weight, backend=backend), ref)
    ok &= torch.equal(assemble(b.requests, b.input_ids, out=b.out.clone(), backend=backend), ref)
    for fn in BASELINES.values():
        ok &= torch.equal(fn(b.requests, b.input_ids, b.weight), ref)
    return bool(ok)


def measure(b: Built, bw: float, *, modes=("fused", "scatter"), backend: str = "auto",
            repeat: int = 100) -> dict:
    """Every figure of one scenario: floors, GPU and wall times of ours and the baselines.

    GPU times (``gpu_*``) only on CUDA with a Triton backend for ours; ``None`` otherwise.
    """
    device = b.out.device.type
    cuda = device == "cuda"
    esize = b.out.element_size()
    hidden = b.out.shape[1]
    buf = b.out.clone()
    row = dict(
        scenario=b.scenario.name, tokens=b.num_tokens, mm_rows=b.num_mm_rows, hidden=hidden,
        items=sum(len(r.items) for r in b.requests), requests=len(b.requests),
        floor_fused_us=2 * b.num_tokens * hidden * esize / bw * 1e6,  # read + write N x H
        floor_scatter_us=2 * b.num_mm_rows * hidden * esize / bw * 1e6,  # read + write M x H
        host_planning_us=host_planning_us(b),
        host_planning_fresh_us=host_planning_us(b, fresh_requests=True),
    )
    ours_on_gpu = cuda and mmkernels.resolve_backend(backend, b.out.device) == "triton"
    calls = {
        "fused": lambda: assemble(b.requests, b.input_ids, weight=b.weight, backend=backend),
        "scatter": lambda: assemble(b.requests, b.input_ids, out=buf, backend=backend),
    }
    for mode in ("fused", "scatter"):
        run = mode in modes
        row[f"gpu_{mode}_us"] = gpu_time_us(prepared(b, mode)) if run and ours_on_gpu else None
        row[f"wall_{mode}_us"] = wall_time_us(calls[mode], repeat=repeat, device=device) if run else None
    for name, fn in BASELINES.items():
        def call(fn=fn):
            return fn(b.requests, b.input_ids, b.weight)

        row[f"wall_{name}_us"] = wall_time_us(call, repeat=repeat, device=device)
        row[f"gpu_{name}_us"] = gpu_time_us(call) if cuda else None
    return row
