"""The steady step's host time, this tree against another checkout, in one run.

    python -m bench.steady_ab --other PATH [--scenario SUBSTR ...] [--repeat 500] [--out DIR]

``PATH`` is another checkout of this repository (for example ``git worktree add PATH
COMMIT``). Each tree runs in a subprocess of its own (``PYTHONPATH`` set to it), on the
same scenarios, one after the other on the same machine: per scenario the host time of
a steady step (call to return, the device idle before each; the lowest of three medians
of ``--repeat`` calls), directly and through a CUDA graph (on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

_SNIPPET = r"""
import json, sys, torch
from bench.scenarios import build
from bench.bench_resident import RESIDENT_SCENARIOS, host_us
from mmassembler import Assembler
device = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
names, repeat = json.loads(sys.argv[1]), int(sys.argv[2])
out = {}
for sc in RESIDENT_SCENARIOS:
    if names and not any(k in sc.name for k in names):
        continue
    b = build(sc, device=device)
    p = [r.prefix_len for r in b.requests]
    e = [r.extend_len for r in b.requests]
    row = {}
    for mode in (("direct", "graph") if device == "cuda" else ("direct",)):
        asm = Assembler(weight=b.weight, max_tokens=b.num_tokens, max_requests=len(b.requests),
                        cuda_graph=mode == "graph")
        h = list(asm.add_requests([(r.items, r.prompt_len) for r in b.requests]))
        asm.assemble(h, p, e, b.input_ids)
        row[mode] = host_us(lambda: asm.assemble(h, p, e, b.input_ids), repeat, sync)
    out[sc.name] = row
print("RESULT" + json.dumps(out))
"""


def run_tree(tree: Path, names: list, repeat: int) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{tree / 'python'}")
    got = subprocess.run([sys.executable, "-c", _SNIPPET, json.dumps(names), str(repeat)], cwd=tree, env=env,
                         capture_output=True, text=True, check=True)
    line = next(x for x in got.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.steady_ab", description=__doc__.splitlines()[0])
    ap.add_argument("--other", type=Path, required=True, help="another checkout of this repository")
    ap.add_argument("--scenario", nargs="*", default=[])
    ap.add_argument("--repeat", type=int, default=500)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parent.parent
    results = {"this": run_tree(here, args.scenario, args.repeat),
               "other": run_tree(args.other.resolve(), args.scenario, args.repeat)}
    lines = ["| scenario | mode | this µs | other µs | other / this |", "|---|---|---:|---:|---:|"]
    for name, row in results["this"].items():
        for mode, us in row.items():
            o = results["other"].get(name, {}).get(mode)
            lines.append(f"| {name} | {mode} | {us:.1f} | {'-' if o is None else f'{o:.1f}'} | "
                         f"{'-' if o is None else f'{o / us:.2f}x'} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "steady_ab.json").write_text(json.dumps(results, indent=1))
        (args.out / "steady_ab.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
