"""``python -m bench --peers``: ours beside the engines' own code, one run, same batches,
three modes per scenario.

- ``first``: first contact. Every call meets new engine objects with never-seen keys:
  both caches cold, the encoder runs (it returns each item's feature); our adapters
  register the requests, and remove them at their next call.
- ``walk``: whole prompts chunk by chunk (the scenario's chunk, else 2048 tokens a step),
  new objects every walk, requests registered on first appearance and removed after
  their last chunk; the figure is a whole walk.
- ``steady``: the same step repeated on the same objects (caches warm, requests
  registered).

Paths: SGLang 0.5.23's ``embed_mm_inputs`` and ``general_mm_embed_routine``, vLLM 0.33.0's
runner ``_gather_mm_embeddings`` + ``embed_input_ids`` (loaded from their published wheels
by ``mmassembler.testing.engine_code``; on a machine without a registry export them first, see the
README), our drop-ins for each, the ``Assembler`` and the stateless ``assemble`` (see
``bench.serving``). Every output of every mode is checked bit for bit against the
reference in a first pass; then each figure is timed: host (call to return, device idle
before) and wall (call + synchronize), medians, µs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
from pathlib import Path

import torch

from bench.bench_resident import RESIDENT_SCENARIOS
from bench.harness import copy_bandwidth
from bench.scenarios import build, scaled
from bench.serving import Req, ReqItem, drivers, run_steps

logger = logging.getLogger("bench.peers")
MODES = ("first", "walk", "steady")
PATHS = ("sglang", "ours_sglang", "sglang_routine", "ours_sglang_routine", "vllm", "ours_vllm",
         "assembler", "stateless", "plugin_sglang_routine", "plugin_vllm")
PAIRS = (("sglang", "ours_sglang"), ("sglang_routine", "ours_sglang_routine"), ("vllm", "ours_vllm"),
         ("sglang_routine", "plugin_sglang_routine"), ("vllm", "plugin_vllm"))
WALK_CHUNK = 2048


def workload(b) -> tuple[dict, list, list]:
    """The scenario as plain requests, its step's windows, and its walk's steps."""
    reqs = {i: Req(b.prompts[i], [ReqItem(it.spans[0], it.embedding) for it in r.items])
            for i, r in enumerate(b.requests)}
    windows = [(i, r.prefix_len, r.extend_len) for i, r in enumerate(b.requests)]
    chunk = b.scenario.chunk or WALK_CHUNK
    walk, k = [], 0
    while True:
        step = [(i, k, min(chunk, reqs[i].prompt_len - k)) for i in reqs if k < reqs[i].prompt_len]
        if not step:
            break
        walk.append(step)
        k += chunk
    return reqs, windows, walk


def _leaves(steps) -> list:
    last = {}
    for i, step in enumerate(steps):
        for r, _, _ in step:
            last[r] = i
    out = [[] for _ in steps]
    for r, i in last.items():
        out[i].append(r)
    return out


def measure(b, sg, vl, repeat: int, names=None) -> dict:
    """Every figure of one scenario: per mode and path, host and wall medians (µs)."""
    reqs, windows, walk = workload(b)
    cuda = b.weight.is_cuda
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
    row = dict(scenario=b.scenario.name, tokens=b.num_tokens, mm_rows=b.num_mm_rows,
               walk_steps=len(walk), walk_tokens=sum(e for s in walk for _, _, e in s))
    all_leave = [list(reqs)]
    walk_leave = _leaves(walk)
    with torch.no_grad():
        limits = dict(max_tokens=max(b.num_tokens, max(sum(e for _, _, e in s) for s in walk)),
                      max_requests=len(b.requests))  # what the engine knows of its step
        for name, drv in drivers(reqs, b.weight, sg, vl, names, limits):
            # first contact: new objects and keys every call (checked once, then timed)
            run_steps(drv, reqs, [windows], b.weight, check=True, sync=sync, leave=[all_leave[0]])
            t = [run_steps(drv, reqs, [windows], b.weight, check=False, sync=sync, leave=[all_leave[0]])[0]
                 for _ in range(repeat)]
            row[f"first_{name}_host_us"] = statistics.median(x[0] for x in t)
            row[f"first_{name}_wall_us"] = statistics.median(x[1] for x in t)
            # whole prompts, chunk by chunk
            run_steps(drv, reqs, walk, b.weight, check=True, sync=sync, leave=walk_leave)
            walks = [run_steps(drv, reqs, walk, b.weight, check=False, sync=sync, leave=walk_leave)
                     for _ in range(max(3, repeat // max(1, len(walk))))]
            row[f"walk_{name}_host_us"] = statistics.median(sum(x[0] for x in w) for w in walks)
            row[f"walk_{name}_wall_us"] = statistics.median(sum(x[1] for x in w) for w in walks)
            # steady: the same step on the same objects
            run_steps(drv, reqs, [windows], b.weight, check=True, sync=sync)
            t = run_steps(drv, reqs, [windows] * (repeat + 5), b.weight, check=False, sync=sync)[5:]
            row[f"steady_{name}_host_us"] = statistics.median(x[0] for x in t)
            row[f"steady_{name}_wall_us"] = statistics.median(x[1] for x in t)
            drv.finish(list(reqs))
            drv.close()
            logger.info("%s %s: first %.0f, walk %.0f, steady %.0f µs wall", b.scenario.name, name,
                        row[f"first_{name}_wall_us"], row[f"walk_{name}_wall_us"], row[f"steady_{name}_wall_us"])
    return row


def ratios(row: dict) -> dict:
    """engine / ours (wall) per drop-in and mode; and the faster engine over ours."""
    out = {}
    for mode in MODES:
        for engine, ours in PAIRS:
            e, o = row.get(f"{mode}_{engine}_wall_us"), row.get(f"{mode}_{ours}_wall_us")
            if e and o:
                out[f"{mode}_{engine}_over_ours"] = e / o
        engines = [row[k] for k in (f"{mode}_sglang_wall_us", f"{mode}_sglang_routine_wall_us",
                                    f"{mode}_vllm_wall_us") if row.get(k)]
        for ours in ("assembler", "stateless"):
            if engines and row.get(f"{mode}_{ours}_wall_us"):
                out[f"{mode}_best_engine_over_{ours}"] = min(engines) / row[f"{mode}_{ours}_wall_us"]
    return out


def table(rows, mode: str) -> str:
    head = ["scenario"] + [p for p in PATHS] + ["SGLang/ours", "routine/ours", "vLLM/ours",
                                                 "best engine/Assembler"]
    lines = [f"**{mode}** (wall µs, median{'; a whole walk' if mode == 'walk' else ''})", "",
             "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in rows:
        cells = [r["scenario"]] + [f"{r[k]:.0f}" if (k := f"{mode}_{p}_wall_us") in r else "-" for p in PATHS]
        for key in (f"{mode}_sglang_over_ours", f"{mode}_sglang_routine_over_ours", f"{mode}_vllm_over_ours",
                    f"{mode}_best_engine_over_assembler"):
            cells.append(f"{r[key]:.2f}x" if key in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench --peers", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", nargs="*", default=[], help="substrings of scenario names (bench/scenarios.py)")
    ap.add_argument("--paths", nargs="*", choices=PATHS, help="paths to time (default: all)")
    ap.add_argument("--repeat", type=int, default=30, help="calls per first-contact and steady median")
    ap.add_argument("--out", type=Path, help="folder for peers.json and peers.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from mmassembler.testing.engine_code import load_sglang, load_vllm
    from mmassembler.testing.engine_wheels import WheelUnavailable

    try:
        sg, vl = load_sglang(), load_vllm()
    except WheelUnavailable as exc:
        print(f"--peers needs the engines' wheels: {exc}")
        return 2
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        print("CPU run: scenarios scaled to 1/16 of their rows and 1/8 of hidden; CPU wall times")
    rows = []
    for sc in RESIDENT_SCENARIOS:
        if args.scenario and not any(k in sc.name for k in args.scenario):
            continue
        b = build(sc if cuda else scaled(sc, 1 / 16, 1 / 8), device=device)
        row = measure(b, sg, vl, args.repeat, args.paths)
        row.update(ratios(row))
        rows.append(row)
    text = "\n\n".join(table(rows, m) for m in MODES)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                    python=platform.python_version(), repeat=args.repeat,
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    copy_bandwidth_GBps=copy_bandwidth(device) / 1e9)
        (args.out / "peers.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        (args.out / "peers.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
