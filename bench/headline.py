"""The README's headline tables from a ``--peers`` and a ``--trace`` run's JSON.

    python -m bench.headline PEERS_JSON TRACE_JSON
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLS = [("SGLang", "sglang"), ("ours (SGLang)", "ours_sglang"), ("SGLang routine", "sglang_routine"),
        ("ours (routine)", "ours_sglang_routine"), ("vLLM", "vllm"), ("ours (vLLM)", "ours_vllm"),
        ("Assembler", "assembler"), ("stateless", "stateless")]


def peers_table(rows, mode: str) -> str:
    head = "| scenario | " + " | ".join(c for c, _ in COLS) + " | SGLang / ours | routine / ours | vLLM / ours |"
    lines = [head, "|---" + "|---:" * (len(COLS) + 3) + "|"]
    for r in rows:
        cells = [r["scenario"].replace(" (planning)", "")]
        cells += [f"{r[f'{mode}_{k}_wall_us']:.0f}" for _, k in COLS]
        for e, o in (("sglang", "ours_sglang"), ("sglang_routine", "ours_sglang_routine"), ("vllm", "ours_vllm")):
            cells.append(f"{r[f'{mode}_{e}_wall_us'] / r[f'{mode}_{o}_wall_us']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trace_table(t) -> str:
    res = t["results"]
    best = t["meta"]["faster_engine"]
    lines = ["| path | mean | p50 | p99 | faster engine / ours (mean) | (p99) |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        w = r["wall"]
        ratio = "" if name in ("sglang_routine", "vllm") else (
            f"{res[best]['wall']['mean'] / w['mean']:.2f}x | {res[best]['wall']['p99'] / w['p99']:.2f}x")
        lines.append(f"| {name} | {w['mean']:.0f} | {w['p50']:.0f} | {w['p99']:.0f} | {ratio or '- | -'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("peers", type=Path)
    ap.add_argument("trace", type=Path)
    args = ap.parse_args(argv)
    p, t = json.loads(args.peers.read_text()), json.loads(args.trace.read_text())
    for mode, title in (("first", "First contact"), ("walk", "Whole prompts, chunk by chunk (a walk)"),
                        ("steady", "Steady step (the same windows again)")):
        print(f"**{title}** (wall µs)\n\n{peers_table(p['rows'], mode)}\n")
    m = t["meta"]
    print(f"**A serving trace** ({m['requests']} requests, {m['items']} items, {m['steps']} steps of up to "
          f"{m['args']['budget']} tokens, hidden {m['args']['hidden']}; wall µs per step)\n\n{trace_table(t)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
