"""The README's headline tables from a ``--peers`` and a ``--trace`` run's JSON.

    python -m bench.headline PEERS_JSON TRACE_JSON
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLS = [("SGLang", "sglang"), ("ours (SGLang)", "ours_sglang"), ("SGLang routine", "sglang_routine"),
        ("ours (routine)", "ours_sglang_routine"), ("plugin (routine)", "plugin_sglang_routine"), ("vLLM", "vllm"),
        ("ours (vLLM)", "ours_vllm"), ("plugin (vLLM)", "plugin_vllm"), ("Assembler", "assembler"),
        ("stateless", "stateless")]


def peers_table(rows, mode: str) -> str:
    cols = [(c, k) for c, k in COLS if any(f"{mode}_{k}_wall_us" in r for r in rows)]
    pairs = [(e, o) for e, o in (("sglang", "ours_sglang"), ("sglang_routine", "ours_sglang_routine"),
                                 ("vllm", "ours_vllm"), ("vllm", "assembler"))
             if any(f"{mode}_{o}_wall_us" in r for r in rows)]
    head = ("| scenario | " + " | ".join(c for c, _ in cols) + " | "
            + " | ".join(f"{e} / {o}" for e, o in pairs) + " |")
    lines = [head, "|---" + "|---:" * (len(cols) + len(pairs)) + "|"]
    for r in rows:
        cells = [r["scenario"].replace(" (planning)", "")]
        cells += [f"{r[f'{mode}_{k}_wall_us']:.0f}" if f"{mode}_{k}_wall_us" in r else "-" for _, k in cols]
        for e, o in pairs:
            cells.append(f"{r[f'{mode}_{e}_wall_us'] / r[f'{mode}_{o}_wall_us']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trace_table(t) -> str:
    res = t["results"]
    best = t["meta"]["faster_engine"]
    lines = ["| path | wall mean | wall p50 | wall p99 | host mean | host p99 | p99 / mean | faster engine / ours "
             "(mean) | (p99) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        w, h = r["wall"], r["host"]
        ratio = "" if name in ("sglang_routine", "vllm") else (
            f"{res[best]['wall']['mean'] / w['mean']:.2f}x | {res[best]['wall']['p99'] / w['p99']:.2f}x")
        lines.append(f"| {name} | {w['mean']:.0f} | {w['p50']:.0f} | {w['p99']:.0f} | {h['mean']:.0f} | "
                     f"{h['p99']:.0f} | {w['p99'] / w['mean']:.2f} | {ratio or '- | -'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("peers", type=Path)
    ap.add_argument("trace", type=Path, nargs="+")
    args = ap.parse_args(argv)
    p = json.loads(args.peers.read_text())
    for mode, title in (("first", "First contact"), ("walk", "Whole prompts, chunk by chunk (a walk)"),
                        ("steady", "Steady step (the same windows again)")):
        print(f"**{title}** (wall µs)\n\n{peers_table(p['rows'], mode)}\n")
    for path in args.trace:
        t = json.loads(path.read_text())
        m = t["meta"]
        print(f"**A serving trace** ({m['requests']} requests, {m['items']} items, {m['steps']} steps of up to "
              f"{m['args']['budget']} tokens, hidden {m['args']['hidden']}; µs per step)\n\n{trace_table(t)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
