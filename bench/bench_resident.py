"""The resident Assembler vs the stateless path vs the engines' usual paths vs the floor.

    python -m bench.bench_resident [--scenario SUBSTR ...] [--repeat 200] [--out DIR]

Per scenario, side by side in one run (bf16, fused mode unless noted):
- floor: N x H read + written at the measured device-to-device copy bandwidth;
- GPU time (device work alone, CUDA-graph replays): the step kernel, the stateless
  path's segment kernel, and the baselines;
- host time (call -> return, GPU idle before each call), and wall (call + synchronize):
  the Assembler's steady-state step (requests registered, sources held) with direct
  launch and with graph replay, in fused and scatter mode; its first chunk (register +
  step, precomputed embeddings so no encoding, new ``Item`` objects each call); the
  stateless ``assemble`` on a first chunk (new ``Item`` objects) and with requests reused
  (its per-item checks memoised); the baselines;
- registration host time per item (``add_request``).
"""

from __future__ import annotations

import argparse
import logging
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.baselines import BASELINES
from bench.harness import copy_bandwidth, gpu_time_us, prepared, wall_time_us
from bench.scenarios import SCENARIOS, PLANNING_256, Scenario, build
from mmassembler import Assembler, Item, Request, assemble

MANY_REQUESTS = Scenario("256x1x64 t32 H4096", 256, 1, 64, 32, 4096)
RESIDENT_SCENARIOS = SCENARIOS + [MANY_REQUESTS, PLANNING_256]


def host_us(fn, repeat: int, sync, rounds: int = 3) -> float:
    """Time from call to return with the device idle before each call (µs): the lowest of
    ``rounds`` medians of ``repeat`` calls, so a burst of load on a shared host lands in
    one round's median and not in the figure."""
    for _ in range(5):
        fn()
    medians = []
    for _ in range(rounds):
        samples = []
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        medians.append(statistics.median(samples))
    sync()
    return 1e6 * min(medians)


def windows(b):
    return (np.arange(len(b.requests)), np.array([r.prefix_len for r in b.requests]),
            np.array([r.extend_len for r in b.requests]))


def measure(b, bw: float, repeat: int) -> dict:
    """Every figure of one scenario (see the module doc)."""
    dev = b.input_ids.device
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    hidden, n, esize = b.weight.shape[1], b.num_tokens, b.weight.element_size()
    row = dict(scenario=b.scenario.name, tokens=n, mm_rows=b.num_mm_rows, hidden=hidden,
               requests=len(b.requests), items=sum(len(r.items) for r in b.requests),
               floor_us=2 * n * hidden * esize / bw * 1e6)
    cap = dict(max_tokens=n, max_requests=len(b.requests),
               max_items=max(1, row["items"]), max_runs=max(1, row["items"]))
    _, p, e = windows(b)
    ref = assemble(b.requests, b.input_ids, weight=b.weight, backend="torch")
    out_buf = b.out.clone()
    for mode in ("fused", "scatter"):
        for graph in ((False, True) if cuda else (False,)):
            if mode == "scatter" and graph:
                asm = Assembler(hidden=hidden, dtype=b.weight.dtype, device=dev, cuda_graph=True,
                                out=out_buf, **cap)
            else:
                asm = Assembler(weight=b.weight if mode == "fused" else None, hidden=hidden,
                                dtype=b.weight.dtype, device=dev, cuda_graph=graph, **cap)
            h = np.array(asm.add_requests([(r.items, r.prompt_len) for r in b.requests]))
            kw = {} if mode == "fused" or graph else {"out": out_buf}
            if mode == "scatter":
                out_buf.copy_(b.out)
            ids = b.input_ids
            if graph:  # as an engine does: ids written into the persistent buffer
                ids = asm.input_ids[:n]
                ids.copy_(b.input_ids)
            got = asm.assemble(h, p, e, ids, **kw)
            assert torch.equal(got, ref), f"{b.scenario.name} {mode} graph={graph}: wrong result"
            tag = f"{mode}{'_graph' if graph else ''}"
            step = lambda asm=asm, h=h, kw=kw, ids=ids: asm.assemble(h, p, e, ids, **kw)  # noqa: E731
            row[f"host_{tag}_us"] = host_us(step, repeat, sync)
            row[f"wall_{tag}_us"] = wall_time_us(step, repeat=repeat, device=dev.type)
            if cuda and not graph:
                out = torch.empty_like(b.out) if mode == "fused" else out_buf
                row[f"gpu_{tag}_us"] = gpu_time_us(lambda asm=asm, out=out: asm._op.launch(
                    out, None, b.input_ids if mode == "fused" else None, asm.weight, n))
            if mode == "fused" and not graph:
                row["first_chunk_host_us"], row["first_chunk_wall_us"], row["register_us_per_item"] = \
                    first_chunk(asm, b, p, e, repeat, sync)
    row["first_chunk_stateless_host_us"], row["first_chunk_stateless_wall_us"] = \
        stateless_first_chunk(b, repeat, sync)
    row["host_stateless_us"] = host_us(lambda: assemble(b.requests, b.input_ids, weight=b.weight),
                                       repeat, sync)
    row["wall_stateless_us"] = wall_time_us(lambda: assemble(b.requests, b.input_ids, weight=b.weight),
                                            repeat=repeat, device=dev.type)
    if cuda:
        row["gpu_stateless_us"] = gpu_time_us(prepared(b, "fused"))
    for name, fn in BASELINES.items():
        call = lambda fn=fn: fn(b.requests, b.input_ids, b.weight)  # noqa: E731
        row[f"wall_{name}_us"] = wall_time_us(call, repeat=repeat, device=dev.type)
        # index_copy pins host memory per call: not capturable
        row[f"gpu_{name}_us"] = gpu_time_us(call, capturable=name != "index_copy") if cuda else None
    return row


def fresh_items(b, copies: int) -> list[list[list[Item]]]:
    """``copies`` sets of each request's items as new ``Item`` objects (same embeddings):
    a first chunk meets items no earlier call has checked or memoised."""
    return [[[Item(it.key, it.spans, it.modality, it.embedding, it.data, it.embed_mask)
              for it in r.items] for r in b.requests] for _ in range(copies)]


def first_chunk(asm, b, p, e, repeat, sync):
    """(host, wall) of registering every request (one ``add_requests`` call, as an engine
    registers a step's new requests) + the first step, and registration µs per item; each
    call registers new ``Item`` objects."""
    host, wall, reg = [], [], []
    sets = fresh_items(b, max(5, repeat // 10))
    for items in sets:
        asm.remove_requests(np.flatnonzero(asm.registry.live))
        sync()
        t0 = time.perf_counter()
        h = np.array(asm.add_requests([(its, r.prompt_len) for its, r in zip(items, b.requests)]))
        t1 = time.perf_counter()
        asm.assemble(h, p, e, b.input_ids)
        t2 = time.perf_counter()
        sync()
        t3 = time.perf_counter()
        reg.append((t1 - t0) / max(1, sum(len(r.items) for r in b.requests)))
        host.append(t2 - t0)
        wall.append(t3 - t0)
    return tuple(1e6 * statistics.median(x) for x in (host, wall, reg))


def stateless_first_chunk(b, repeat, sync) -> tuple[float, float]:
    """(host, wall) of the stateless ``assemble`` on requests of new ``Item`` objects (what
    a first chunk costs it: no memoised checks)."""
    host, wall = [], []
    for items in fresh_items(b, max(5, repeat // 10)):
        reqs = [Request(its, r.prefix_len, r.extend_len, r.prompt_len) for its, r in zip(items, b.requests)]
        sync()
        t0 = time.perf_counter()
        assemble(reqs, b.input_ids, weight=b.weight)
        t1 = time.perf_counter()
        sync()
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    return tuple(1e6 * statistics.median(x) for x in (host, wall))


COLUMNS = [("floor", "floor_us"), ("GPU step", "gpu_fused_us"), ("GPU old", "gpu_stateless_us"),
           ("host step", "host_fused_us"), ("host graph", "host_fused_graph_us"),
           ("wall step", "wall_fused_us"), ("wall graph", "wall_fused_graph_us"),
           ("host scat", "host_scatter_us"), ("wall scat", "wall_scatter_us"),
           ("host first", "first_chunk_host_us"), ("wall first", "first_chunk_wall_us"),
           ("reg/item", "register_us_per_item"), ("host first old", "first_chunk_stateless_host_us"),
           ("host old", "host_stateless_us"),
           ("wall old", "wall_stateless_us"), ("wall m_s", "wall_masked_scatter_us"),
           ("wall i_c", "wall_index_copy_us"), ("GPU m_s", "gpu_masked_scatter_us")]


def sweep(b) -> list[dict]:
    """GPU time of the step kernel over block shapes (rows x columns x warps)."""
    from mmkernels.step_op import StepConfig, StepOp

    asm = Assembler(weight=b.weight, max_tokens=b.num_tokens, max_requests=len(b.requests))
    h = np.array([asm.add_request(r.items, r.prompt_len) for r in b.requests])
    _, p, e = windows(b)
    out = asm.assemble(h, p, e, b.input_ids)
    rows = []
    shapes = [(4, 2048, 4), (2, 4096, 4), (2, 4096, 8), (1, 4096, 4), (1, 8192, 8), (2, 8192, 8),
              (4, 4096, 8), (4, 1024, 4), (8, 2048, 4), (2, 512, 4), (4, 512, 4), (8, 512, 4),
              (16, 512, 4), (8, 256, 4)]
    for (block_rows, block_cols, warps), per_sm in itertools.product(shapes, (0,)):
        cfg = StepConfig(block_rows, min(block_cols, 1 << (b.weight.shape[1] - 1).bit_length()), warps,
                         per_sm)
        op = StepOp(asm.tables, hidden=asm.hidden, ds_cols=0, dtype=asm.dtype, fused=True,
                    interpreted=False, config=cfg)
        try:
            us = gpu_time_us(lambda op=op: op.launch(out, None, b.input_ids, b.weight, b.num_tokens),
                             rep_ms=60)
        except Exception as exc:  # noqa: BLE001 - a shape the compiler rejects is reported
            us = f"failed: {type(exc).__name__}"
        rows.append(dict(scenario=b.scenario.name, block_rows=block_rows, block_cols=cfg.block_cols,
                         warps=warps, programs_per_sm=per_sm, gpu_us=us))
        print(rows[-1], flush=True)
    return rows


def search_sweep(b) -> list[dict]:
    """GPU time of the step kernel (the default block shape) over keys per search round."""
    import dataclasses

    from mmkernels.step_op import StepOp, step_config

    asm = Assembler(weight=b.weight, max_tokens=b.num_tokens, max_requests=len(b.requests))
    h = np.array(asm.add_requests([(r.items, r.prompt_len) for r in b.requests]))
    _, p, e = windows(b)
    out = asm.assemble(h, p, e, b.input_ids)
    rows = []
    for keys in (2, 4, 8, 16, 32, 64, 128):
        cfg = dataclasses.replace(step_config(asm.hidden, False), search_keys=keys)
        op = StepOp(asm.tables, hidden=asm.hidden, ds_cols=0, dtype=asm.dtype, fused=True,
                    interpreted=False, config=cfg)
        us = gpu_time_us(lambda op=op: op.launch(out, None, b.input_ids, b.weight, b.num_tokens), rep_ms=60)
        rows.append(dict(scenario=b.scenario.name, search_keys=keys, gpu_us=us))
        print(rows[-1], flush=True)
    return rows


def table(rows) -> str:
    head = "| scenario | " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        cells = [f"{r[k]:.1f}" if isinstance(r.get(k), float) else "-" for _, k in COLUMNS]
        lines.append(f"| {r['scenario']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    """Host and wall time per step: the Assembler (direct, graph) vs the stateless path vs
    the baselines, with the floor (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("floor", "floor_us"), ("Assembler wall", "wall_fused_us"),
              ("Assembler wall (graph)", "wall_fused_graph_us"), ("stateless wall", "wall_stateless_us"),
              ("masked_scatter wall", "wall_masked_scatter_us"), ("index_copy wall", "wall_index_copy_us"),
              ("Assembler host", "host_fused_us"), ("Assembler host (graph)", "host_fused_graph_us")]
    x = np.arange(len(rows))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(13, 5))
    for k, (label, key) in enumerate(series):
        ax.bar(x + k * width, [r.get(key) or 0 for r in rows], width, label=label)
    ax.set_xticks(x + 0.4, [r["scenario"].split(" (")[0] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("µs per step (median)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", nargs="*", default=[])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--sweep", action="store_true", help="block-shape sweep of the step kernel")
    ap.add_argument("--search", action="store_true", help="keys-per-search-round sweep")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.sweep or args.search:
        found = [(sweep if args.sweep else search_sweep)(build(sc, device=device)) for sc in RESIDENT_SCENARIOS
                 if not args.scenario or any(k in sc.name for k in args.scenario)]
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            name = "sweep.json" if args.sweep else "search.json"
            (args.out / name).write_text(json.dumps(found, indent=1))
        return 0
    bw = copy_bandwidth(device)
    rows = []
    for sc in RESIDENT_SCENARIOS:
        if args.scenario and not any(k in sc.name for k in args.scenario):
            continue
        print(f"measuring {sc.name} ({device}{'' if device == 'cuda' else ': CPU run, torch backend'}) ...",
              flush=True)
        rows.append(measure(build(sc, device=device), bw, args.repeat))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                torch=torch.__version__, bandwidth_bytes_per_s=bw)
    print(f"\n{meta}\n{table(rows)}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "resident.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        try:
            plot(rows, args.out / "resident.png")
        except ImportError:  # matplotlib is the bench extra
            logging.getLogger(__name__).warning("matplotlib is not installed: no plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
