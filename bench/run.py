"""The benchmark runner: ``python -m bench``.

    python -m bench --peers [--scenario SUBSTR ...] [--out DIR]   (bench/bench_peers.py)
    python -m bench --trace [--requests N] [--budget T] [--out DIR]  (bench/bench_trace.py)
    python -m bench [--suite kernel rows items hidden] [--scenario SUBSTR ...]
                    [--mode fused scatter] [--dtype bfloat16] [--backend auto]
                    [--repeat 100] [--out DIR]

For each scenario: ours in fused and scatter mode, the engines' usual paths
(``masked_scatter`` and ``index_copy`` baselines) and the floor, the bytes a mode must
move over the measured device-to-device copy bandwidth. On a GPU it reports GPU time
(CUDA-graph replay of the device work) and wall time (the whole call, synchronized); on
a CPU-only machine it still runs, with the torch backend, scaled-down sizes and CPU wall
times, labelled as such. Writes ``results.json`` (device, versions, every figure) and
``plot.png`` into ``--out``, and prints a table with ours/floor and baseline/ours.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import time
from pathlib import Path

import torch

import mmkernels
from bench.bench_assemble import measure, verify
from bench.harness import copy_bandwidth
from bench.scenarios import SUITES, build, scaled

logger = logging.getLogger("bench")

CPU_SCALE = (1 / 16, 1 / 4)  # rows, hidden: keeps a CPU run to a minute or two


def select(suites, substrings, cpu: bool):
    """(suite, scenario) pairs to run, scaled down on a CPU."""
    chosen = []
    for suite in suites:
        for sc in SUITES[suite]:
            if substrings and not any(k in sc.name for k in substrings):
                continue
            chosen.append((suite, scaled(sc, *CPU_SCALE) if cpu else sc))
    return chosen


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def add_ratios(row: dict) -> dict:
    """ours / floor and baseline / ours, on GPU time where there is one, else wall time."""
    kind = "gpu" if row.get("gpu_fused_us") is not None or row.get("gpu_scatter_us") is not None \
        else "wall"
    row["ratio_basis"] = kind
    row["fused_over_floor"] = _ratio(row.get(f"{kind}_fused_us"), row["floor_fused_us"])
    row["scatter_over_floor"] = _ratio(row.get(f"{kind}_scatter_us"), row["floor_scatter_us"])
    ours = row.get(f"{kind}_fused_us") or row.get(f"{kind}_scatter_us")
    for base in ("masked_scatter", "index_copy"):
        row[f"{base}_over_ours"] = _ratio(row.get(f"{kind}_{base}_us"), ours)
        row[f"{base}_over_ours_wall"] = _ratio(row.get(f"wall_{base}_us"),
                                               row.get("wall_fused_us") or row.get("wall_scatter_us"))
    return row


def _f(v, spec=".1f", suffix=""):
    return "-" if v is None else f"{v:{spec}}{suffix}"


def format_table(rows: list[dict]) -> str:
    """One line per scenario; times in µs; the best time of each row in ``*...*``."""
    head = ["suite", "scenario", "mm rows", "basis", "floor", "ours fused", "x floor",
            "ours scatter", "x floor", "masked_scatter", "/ours", "index_copy", "/ours",
            "wall fused", "wall masked_scatter", "plan"]
    lines = [head]
    for r in rows:
        k = r["ratio_basis"]
        times = {n: r.get(f"{k}_{n}_us") for n in ("fused", "scatter", "masked_scatter", "index_copy")}
        best = min((v for v in times.values() if v is not None), default=None)
        cell = {n: ("*" + _f(v) + "*" if v is not None and v == best else _f(v)) for n, v in times.items()}
        lines.append([r["suite"], r["scenario"], str(r["mm_rows"]), k, _f(r["floor_fused_us"]),
                      cell["fused"], _f(r["fused_over_floor"], ".2f"), cell["scatter"],
                      _f(r["scatter_over_floor"], ".2f"), cell["masked_scatter"],
                      _f(r["masked_scatter_over_ours"], ".1f", "x"), cell["index_copy"],
                      _f(r["index_copy_over_ours"], ".1f", "x"), _f(r.get("wall_fused_us")),
                      _f(r.get("wall_masked_scatter_us")), _f(r["host_planning_us"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(" | ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def plot(rows: list[dict], path: Path, device_name: str) -> bool:
    """Time vs rows / items / hidden per sweep, ours vs baselines vs floor, log scales."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install '.[bench]')")
        return False
    def rows_of(suite):  # what the sweep holds fixed, as this run built it (CPU runs shrink it)
        sel = [r["mm_rows"] for r in rows if r["suite"] == suite]
        return f"{sel[0] // 1024}k" if sel and sel[0] >= 1024 else (str(sel[0]) if sel else "?")

    panels = [("rows", "mm_rows", "multimodal rows"), ("items", "items", f"items ({rows_of('items')} rows)"),
              ("hidden", "hidden", f"hidden size ({rows_of('hidden')} rows)")]
    panels = [p for p in panels if any(r["suite"] == p[0] for r in rows)] or [
        ("kernel", "mm_rows", "multimodal rows (kernel scenarios)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (suite, x, label) in zip(axes[0], panels):
        sel = sorted((r for r in rows if r["suite"] == suite), key=lambda r: r[x])
        if not sel:
            continue
        k = sel[0]["ratio_basis"]
        xs = [r[x] for r in sel]
        for key, name, style in ((f"{k}_fused_us", "ours fused", "-o"),
                                 (f"{k}_scatter_us", "ours scatter", "-s"),
                                 (f"{k}_masked_scatter_us", "masked_scatter", "--^"),
                                 (f"{k}_index_copy_us", "index_copy", "--v"),
                                 ("floor_fused_us", "floor (fused)", ":"),
                                 ("floor_scatter_us", "floor (scatter)", ":")):
            ys = [r.get(key) for r in sel]
            if any(y is None for y in ys):
                continue
            ax.plot(xs, ys, style, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{'GPU' if k == 'gpu' else 'wall'} time (µs)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"mmkernels vs engines' usual path vs copy floor — {device_name}"
                 + (" (CPU run: torch backend, scaled-down sizes, wall times)" if "CPU" in device_name else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--peers" in argv:  # ours beside the engines' own code: bench/bench_peers.py
        from bench.bench_peers import main as peers

        return peers([a for a in argv if a != "--peers"])
    if "--trace" in argv:  # a simulated serving run: bench/bench_trace.py
        from bench.bench_trace import main as trace

        return trace([a for a in argv if a != "--trace"])
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", nargs="*", default=["kernel", "rows", "items", "hidden"],
                    choices=list(SUITES))
    ap.add_argument("--scenario", nargs="*", help="substrings of scenario names to keep")
    ap.add_argument("--mode", nargs="*", default=["fused", "scatter"], choices=["fused", "scatter"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--backend", default="auto", choices=list(mmkernels.backend.BACKENDS))
    ap.add_argument("--repeat", type=int, default=100, help="timed calls per wall-time median")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results", help="folder for results.json and plot.png")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cpu = args.device != "cuda"
    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name() if not cpu else f"CPU ({platform.processor() or 'host'})"
    chosen = select(args.suite, args.scenario, cpu)
    bw = copy_bandwidth(args.device)
    logger.info("%s, copy bandwidth %.0f GB/s (read + write), %d scenarios%s", device_name, bw / 1e9,
                len(chosen), " (CPU: torch timings, sizes scaled down)" if cpu else "")
    rows, t0 = [], time.perf_counter()
    for i, (suite, sc) in enumerate(chosen, 1):
        logger.info("[%d/%d %5.0fs] %s: %s", i, len(chosen), time.perf_counter() - t0, suite, sc.name)
        b = build(sc, device=args.device, dtype=dtype)
        if not verify(b, args.backend):
            raise SystemExit(f"{sc.name}: a provider disagrees with the reference")
        row = measure(b, bw, modes=args.mode, backend=args.backend,
                      repeat=args.repeat if not cpu else min(args.repeat, 10))
        rows.append(add_ratios(dict(row, suite=suite)))
        del b
        if not cpu:
            torch.cuda.empty_cache()
    print(format_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    meta = dict(device=device_name, cpu_run=cpu, cpu_scale=CPU_SCALE if cpu else None,
                torch=torch.__version__, triton=triton.__version__, mmkernels=mmkernels.__version__,
                dtype=args.dtype, backend=args.backend, repeat=args.repeat,
                copy_bandwidth_Bps=bw, timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat())
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    if plot(rows, out / "plot.png", device_name):
        logger.info("wrote %s and %s", out / "results.json", out / "plot.png")
    return 0
