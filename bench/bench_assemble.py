"""Ours (fused, scatter) vs the engines' usual paths vs the copy floor, per scenario.

    python -m bench.bench_assemble [--scenario NAME ...] [--sweep] [--save_path DIR]

The floor is the bytes a mode must move over the measured device-to-device copy bandwidth:
fused mode reads and writes N x H (every output row), scatter mode M x H (multimodal rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
from pathlib import Path

import torch

import mmkernels
from bench.baselines import BASELINES
from bench.harness import copy_bandwidth, gpu_time_us, host_time_us, wall_time_us
from bench.scenarios import PLANNING_256, SCENARIOS, Built, build
from mmassembler import Request, assemble, plan_batch
from mmassembler.encode import resolve_sources
from mmkernels.ops import LaunchConfig, build_plan, launch_config, prepare_launch

logger = logging.getLogger("bench")


def prepared(b: Built, mode: str, config: LaunchConfig | None = None):
    """Host work done, metadata on the device: ``.run()`` is the kernel alone."""
    plan = plan_batch(b.requests)
    out = b.out.clone()
    sources, info = resolve_sources(plan, encoders=None, cache=None, device=out.device,
                                    dtype=out.dtype, widths=(out.shape[1],))
    if mode == "fused":
        return prepare_launch(out, None, sources, plan.segments, b.input_ids, b.weight,
                              config=config, info=info)
    return prepare_launch(out, None, sources, plan.segments, config=config, info=info)


def host_planning_us(b: Built, fresh_requests: bool = False) -> float:
    """What ``assemble`` does on the host before the upload: plan, sources, metadata (µs).

    Requests are reused across calls (an engine advancing them with ``with_window``), or
    with ``fresh_requests`` rebuilt every call, so per-request indexes are built each time.
    """
    hidden = b.out.shape[1]
    cfg = launch_config(hidden, 0, False)

    def plan_only():
        reqs = b.requests
        if fresh_requests:
            reqs = [Request(r.items, r.prefix_len, r.extend_len, r.prompt_len) for r in reqs]
        plan = plan_batch(reqs)
        sources, info = resolve_sources(plan, encoders=None, cache=None, device=b.out.device,
                                        dtype=b.out.dtype, widths=(hidden,))
        build_plan(plan.segments, sources, cfg.block_rows, hidden, b.out.shape[0], info=info)

    return host_time_us(plan_only)


def verify(b: Built) -> bool:
    """One-shot equality of every provider against the torch reference before timing."""
    ref = assemble(b.requests, b.input_ids, weight=b.weight, backend="torch")
    ok = torch.equal(assemble(b.requests, b.input_ids, weight=b.weight), ref)
    ok &= torch.equal(assemble(b.requests, b.input_ids, out=b.out.clone()), ref)
    for fn in BASELINES.values():
        ok &= torch.equal(fn(b.requests, b.input_ids, b.weight), ref)
    return bool(ok)


def measure(b: Built, bw: float) -> dict:
    esize = b.out.element_size()
    hidden = b.out.shape[1]
    floor_fused = 2 * b.num_tokens * hidden * esize / bw * 1e6  # read + write N x H
    floor_scatter = 2 * b.num_mm_rows * hidden * esize / bw * 1e6  # read + write M x H
    fused, scatter = prepared(b, "fused"), prepared(b, "scatter")
    buf = b.out.clone()
    row = dict(
        scenario=b.scenario.name, tokens=b.num_tokens, mm_rows=b.num_mm_rows, hidden=hidden,
        items=sum(len(r.items) for r in b.requests),
        floor_fused_us=floor_fused, floor_scatter_us=floor_scatter,
        gpu_fused_us=gpu_time_us(fused.run), gpu_scatter_us=gpu_time_us(scatter.run),
        wall_fused_us=wall_time_us(lambda: assemble(b.requests, b.input_ids, weight=b.weight)),
        wall_scatter_us=wall_time_us(lambda: assemble(b.requests, b.input_ids, out=buf)),
        host_planning_us=host_planning_us(b),
        host_planning_fresh_us=host_planning_us(b, fresh_requests=True),
    )
    for name, fn in BASELINES.items():
        row[f"wall_{name}_us"] = wall_time_us(lambda fn=fn: fn(b.requests, b.input_ids, b.weight))
        row[f"gpu_{name}_us"] = gpu_time_us(lambda fn=fn: fn(b.requests, b.input_ids, b.weight))
    return row


def sweep(b: Built, mode: str) -> list[dict]:
    """GPU time of launch configurations (block rows x block columns x warps)."""
    rows = []
    for block_rows in (4, 8, 16, 32):
        for block_cols in (512, 1024, 2048):
            for warps in (4, 8):
                cfg = LaunchConfig(block_rows, min(block_cols, mmkernels.ops.triton_next_pow2(
                    b.out.shape[1])), warps)
                us = gpu_time_us(prepared(b, mode, cfg).run, rep_ms=100)
                rows.append(dict(scenario=b.scenario.name, mode=mode, block_rows=block_rows,
                                 block_cols=cfg.block_cols, warps=warps, gpu_us=us))
    return rows


def format_table(rows: list[dict]) -> str:
    head = ["scenario", "mm rows", "fused floor", "fused gpu", "/floor", "fused wall",
            "scatter floor", "scatter gpu", "/floor", "scatter wall", "masked_scatter gpu",
            "masked_scatter wall", "base/ours wall", "plan us", "plan (new req)"]
    lines = [head]
    for r in rows:
        lines.append([
            r["scenario"], str(r["mm_rows"]), f"{r['floor_fused_us']:.1f}", f"{r['gpu_fused_us']:.1f}",
            f"{r['gpu_fused_us'] / r['floor_fused_us']:.2f}", f"{r['wall_fused_us']:.1f}",
            f"{r['floor_scatter_us']:.1f}", f"{r['gpu_scatter_us']:.1f}",
            f"{r['gpu_scatter_us'] / r['floor_scatter_us']:.2f}", f"{r['wall_scatter_us']:.1f}",
            f"{r['gpu_masked_scatter_us']:.1f}", f"{r['wall_masked_scatter_us']:.1f}",
            f"{r['wall_masked_scatter_us'] / r['wall_fused_us']:.1f}x", f"{r['host_planning_us']:.1f}",
            f"{r['host_planning_fresh_us']:.1f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(" | ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenario", nargs="*", help="substrings of scenario names (default: all)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configurations")
    ap.add_argument("--save_path", default=None, help="folder for the JSON results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    scenarios = [s for s in SCENARIOS + [PLANNING_256]
                 if not args.scenario or any(k in s.name for k in args.scenario)]
    bw = copy_bandwidth()
    logger.info("device %s, copy bandwidth %.0f GB/s (read + write)", torch.cuda.get_device_name(),
                bw / 1e9)
    rows, sweeps = [], []
    for i, sc in enumerate(scenarios, 1):
        logger.info("[%d/%d] %s", i, len(scenarios), sc.name)
        b = build(sc, dtype=dtype)
        if not verify(b):
            raise SystemExit(f"{sc.name}: a provider disagrees with the reference")
        rows.append(measure(b, bw))
        if args.sweep and sc.name.startswith(("16x2x1296", "4x1x4096")):
            sweeps += sweep(b, "fused") + sweep(b, "scatter")
        del b
        torch.cuda.empty_cache()
    print(format_table(rows))
    for s in sorted(sweeps, key=lambda r: (r["scenario"], r["mode"], r["gpu_us"]))[:]:
        logger.info("sweep %s", s)
    if args.save_path:
        path = Path(args.save_path)
        path.mkdir(parents=True, exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                    triton=__import__("triton").__version__, mmkernels=mmkernels.__version__,
                    dtype=args.dtype, copy_bandwidth_Bps=bw, host=platform.node(),
                    timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat())
        (path / "bench_assemble.json").write_text(json.dumps(dict(meta=meta, rows=rows,
                                                                  sweep=sweeps), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
