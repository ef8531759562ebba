"""Where a steady-state Assembler step spends its host time, phase by phase (µs).

    python -m bench.profile_resident [--scenario SUBSTR ...]

Each phase is timed alone (median of 500 calls, device idle before each): the whole step,
its plan, its run alone (the plan made untimed just before), the driver copy and the
launch; then a cProfile of 2,000 steps.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
import time

import torch

from bench.bench_resident import RESIDENT_SCENARIOS, host_us
from bench.scenarios import build
from mmassembler import Assembler


def profile(b) -> None:
    dev = b.input_ids.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    asm = Assembler(weight=b.weight, max_tokens=b.num_tokens, max_requests=len(b.requests))
    h = asm.add_requests([(r.items, r.prompt_len) for r in b.requests])
    p = [r.prefix_len for r in b.requests]
    e = [r.extend_len for r in b.requests]
    ids, n = b.input_ids, b.num_tokens
    out = asm.assemble(h, p, e, ids)
    op, tables, core = asm._op, asm.tables, asm._core
    phases = {
        "step (plan + run)": lambda: asm.assemble(h, p, e, ids),
        "step, out=": lambda: asm.assemble(h, p, e, ids, out=out),
        "plan": lambda: asm.plan(h, p, e, ids),
        "plan, then run": lambda: asm.run(asm.plan(h, p, e, ids)),
        "torch.empty out": lambda: torch.empty((n, asm.hidden), dtype=asm.dtype, device=dev),
        "staging_table()": tables.staging_table,
    }
    run_only = []

    def run_alone():  # plan untimed, then the run alone
        plan = asm.plan(h, p, e, ids)
        sync()
        t0 = time.perf_counter()
        asm.run(plan)
        run_only.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        from mmkernels.launch import _direct_entry

        compiled = op.launcher.compiled
        key, c_entry = next(iter(compiled.items()))
        run_entry = _direct_entry(c_entry[2], c_launch=False)  # through CudaLauncher.__call__
        phases.update({
            "upload_step (driver)": lambda: tables.upload_step(len(h)),
            "upload (Tensor.copy_)": lambda: tables.step.copy_(tables.staging[0], non_blocking=True),
            "launch (C launch)": lambda: compiled.__setitem__(key, c_entry) or op.launch(
                out, None, ids, b.weight, n),
            "launch (run)": lambda: compiled.__setitem__(key, run_entry) or op.launch(
                out, None, ids, b.weight, n),
            "event.record": lambda: tables._half_done[0].record(),
            "raw stream": lambda: torch._C._cuda_getCurrentRawStream(0),
        })
        gasm = Assembler(weight=b.weight, max_tokens=b.num_tokens, max_requests=len(b.requests),
                         cuda_graph=True)
        gh = gasm.add_requests([(r.items, r.prompt_len) for r in b.requests])
        gasm.assemble(gh, p, e, ids)
        phases["graph step (whole)"] = lambda: gasm.assemble(gh, p, e, ids)
        phases["graph step, ids in place"] = lambda: gasm.assemble(gh, p, e, gasm.input_ids[:n])
        phases["CUDAGraph.replay"] = gasm._graph.graphs[0].replay
    met = core.stats.resolving_steps
    print(f"\n{b.scenario.name} ({dev.type}{'' if dev.type == 'cuda' else ': torch backend, CPU µs'})")
    for name, fn in phases.items():
        print(f"  {name:24s} {host_us(fn, 500, sync):8.1f} µs")
    for _ in range(500):
        run_alone()
    print(f"  {'run alone':24s} {1e6 * sorted(run_only)[len(run_only) // 2]:8.1f} µs")
    if op is not None:
        compiled[key] = c_entry
        print(f"  windows met after the first step: {core.stats.resolving_steps - met}; "
              f"direct launches {op.launcher.direct_launches}")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(2000):
        asm.assemble(h, p, e, ids)
    pr.disable()
    sync()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
    print("\n".join(s.getvalue().splitlines()[6:24]))


def fill_switch(device: str) -> None:
    """Both fills of a steady step's windows (``mmassembler.fill``) at 1 to 96 windows,
    host µs each (the windows as lists, as the adapters pass them): where the array fill
    gets cheaper is ``PYTHON_FILL_MAX``."""
    from mmassembler import Item
    from mmassembler.fill import PYTHON_FILL_MAX, NumpyFill, fill_python, write_rows
    from mmassembler.step_inputs import int_array

    print(f"\nsteady fill, host µs (PYTHON_FILL_MAX = {PYTHON_FILL_MAX})\n| windows | Python | arrays |\n|---:|---:|---:|")
    weight = torch.randn(10, 64, device=device)
    for r in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96):
        asm = Assembler(weight=weight, max_tokens=1 << 16, max_requests=r)
        h = asm.add_requests([([Item(k, [(1, 2)], embedding=torch.randn(2, 64, device=device))], 4)
                              for k in range(r)])
        p, e = [0] * r, [4] * r
        asm.assemble(h, p, e, torch.zeros(4 * r, dtype=torch.long, device=device))
        reg, table, numpy_fill = asm.registry, asm.tables.staging_table(), NumpyFill(r)
        reg.sync_req()

        serial = itertools.count(1 << 40)  # a new serial a call, as plan gives: no window is a repeat

        def python():
            fill_python(reg.recs, reg.max_requests, h, p, e, next(serial))
            write_rows(table, reg.recs, h, p, e)

        def arrays():
            numpy_fill.fill(table, reg.req, int_array(h, "h"), int_array(p, "p"), int_array(e, "e"))
            table[0, 0], table[0, 1] = 4 * r, r
        print(f"| {r} | {host_us(python, 2000, lambda: None):.1f} | {host_us(arrays, 2000, lambda: None):.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", nargs="*", default=["1x1x256", "1x128x256", "64x4x64"])
    ap.add_argument("--fill", action="store_true", help="only the two fills at 1 to 96 windows")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.fill:
        fill_switch(device)
        return 0
    for sc in RESIDENT_SCENARIOS:
        if any(k in sc.name for k in args.scenario):
            profile(build(sc, device=device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
