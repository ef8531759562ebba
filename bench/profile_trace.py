"""Where a serving trace's host time goes, for one path: phases timed step by step, then a
cProfile of the whole trace.

    python -m bench.profile_trace [--path ours_vllm] [--budget 8192] [--requests 200]

The trace is ``bench.bench_trace``'s (the same mix, seed and scheduler); the path meets
it once to warm up, then once timed per phase (each phase wrapped with a clock: the
figures include a wrapper's call), then once under cProfile.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import time

import torch

from bench.bench_trace import TRACE_PATHS, make_requests, schedule
from bench.serving import drivers, run_steps

PHASES = [("mmassembler.core", "StepCore", "plan"), ("mmassembler.core", "StepCore", "run"),
          ("mmassembler.core", "StepCore", "_meet"), ("mmassembler.core", None, "resolve"),
          ("mmassembler.core", "StepCore", "_stage"), ("mmassembler.core", None, "check_step_buffers"),
          ("mmassembler.registry", "Registry", "add"), ("mmassembler.registry", "Registry", "remove"),
          ("mmassembler.engines._resident", "Resident", "handles"),
          ("mmassembler.engines._resident", "Resident", "step")]


def _wrap(table: dict) -> None:
    import importlib

    for mod, cls, name in PHASES:
        owner = importlib.import_module(mod)
        if cls:
            owner = getattr(owner, cls)
        fn = getattr(owner, name)

        def timed(*a, _fn=fn, _name=name, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                table[_name].append(time.perf_counter() - t0)
        setattr(owner, name, timed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_trace", description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="ours_vllm", choices=TRACE_PATHS)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, shrink = ("cuda", 1) if cuda else ("cpu", 16)
    sg = vl = None
    if "sglang" in args.path:
        from mmassembler.testing.engine_code import load_sglang

        sg = load_sglang()
    if "vllm" in args.path:
        from mmassembler.testing.engine_code import load_vllm

        vl = load_vllm()
    reqs, weight = make_requests(args.requests, 3584 if cuda else 448, device, 0, shrink)
    budget = args.budget // shrink
    steps, leave = schedule(reqs, 4.0, budget, 0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    drv = dict(drivers(reqs, weight, sg, vl, [args.path], dict(max_tokens=budget, max_requests=256)))[args.path]
    table: dict = collections.defaultdict(list)
    with torch.no_grad():
        run_steps(drv, reqs, steps, weight, check=True, sync=sync, leave=leave)
        drv.finish(list(reqs))
        _wrap(table)
        times = run_steps(drv, reqs, steps, weight, check=False, sync=sync, leave=leave)
        drv.finish(list(reqs))
        print(f"{args.path}: {len(steps)} steps, host mean {sum(t[0] for t in times) / len(times):.1f} µs, "
              f"wall mean {sum(t[1] for t in times) / len(times):.1f} µs")
        for name, v in sorted(table.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {name:20s} {1e6 * sum(v) / len(steps):8.1f} µs a step ({len(v)} calls)")
        pr = cProfile.Profile()
        pr.enable()
        run_steps(drv, reqs, steps, weight, check=False, sync=sync, leave=leave)
        pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print("\n".join(s.getvalue().splitlines()[4:36]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
