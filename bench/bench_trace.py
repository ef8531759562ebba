"""``python -m bench --trace``: a simulated serving run through every path, every step
checked bit for bit.

    python -m bench --trace [--requests 200] [--rate 4] [--budget 8192] [--hidden 3584]
                            [--seed 0] [--paths ...] [--out DIR]

Requests arrive by a seeded Poisson process (``--rate`` a step). The mix: 30% text only
(64-2048 tokens); 40% one image of 256-1296 rows; 20% 2-8 images of 64-576 rows each;
10% a video of 16-64 frames x 64-256 rows (one item, its frames' rows in one run); text
of 16-256 tokens before every item and after the last. A chunked-prefill scheduler gives
each step a token budget (``--budget``): first come first served, requests already being
prefilled first, each taking what is left of the budget (a long prompt is cut into
chunks); a request leaves after its last chunk. Every path meets the same steps (see
``bench.serving``); per path the assembly time per step (wall: call + synchronize; host:
call to return), mean, p50 and p99, and each of ours over the faster engine. Hidden sizes
of real VLMs: 2048, 3584 (default), 4096, 8192. On a CPU the sizes shrink (rows /16,
hidden /8) and the figures are CPU wall times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import numpy as np
import torch

from bench.serving import Req, ReqItem, drivers, run_steps, summary

TRACE_PATHS = ("sglang_routine", "ours_sglang_routine", "vllm", "ours_vllm", "assembler", "stateless",
               "plugin_sglang_routine", "plugin_vllm")


def make_requests(n: int, hidden: int, device: str, seed: int, shrink: int = 1, vocab: int = 32000):
    """``n`` requests of the documented mix; features are views of a shared random pool."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    max_rows = 64 * 256 // shrink
    pool = [(torch.randn(max_rows, hidden, generator=gen) * 2).to(device=device, dtype=torch.bfloat16)
            for _ in range(8)]
    reqs = {}
    for r in range(n):
        kind = rng.choice(4, p=[0.3, 0.4, 0.2, 0.1])
        if kind == 0:
            rows = []
        elif kind == 1:
            rows = [int(rng.integers(256, 1297))]
        elif kind == 2:
            rows = [int(x) for x in rng.integers(64, 577, size=int(rng.integers(2, 9)))]
        else:
            rows = [int(rng.integers(16, 65)) * int(rng.integers(64, 257))]
        rows = [max(1, x // shrink) for x in rows]
        text = [int(rng.integers(16, 257)) // shrink + 1 for _ in range(len(rows) + 1)]
        if kind == 0:
            text = [int(rng.integers(64, 2049)) // shrink + 1]
        pos, items = 0, []
        for t, k in zip(text, rows):
            pos += t
            items.append(ReqItem((pos, pos + k - 1), pool[int(rng.integers(0, 8))][:k]))
            pos += k
        pos += text[-1]
        prompt = torch.randint(0, vocab, (pos,), generator=gen)
        for it in items:
            prompt[it.span[0]:it.span[1] + 1] = vocab + 7  # out-of-vocabulary placeholders
        reqs[r] = Req(prompt.to(device), items)
    return reqs, torch.randn(vocab, hidden, generator=gen).to(device=device, dtype=torch.bfloat16)


def schedule(reqs: dict, rate: float, budget: int, seed: int):
    """Steps of ``(request, prefix, extend)`` windows, and per step the requests that leave."""
    rng = np.random.default_rng(seed + 1)
    arrivals = np.cumsum(rng.exponential(1 / rate, size=len(reqs)))
    done = {r: 0 for r in reqs}
    waiting, running, steps, leave = list(reqs), [], [], []
    t = 0
    while waiting or running:
        while waiting and arrivals[waiting[0]] <= t:
            running.append(waiting.pop(0))
        left, windows, gone = budget, [], []
        for r in running:
            if left == 0:
                break
            n = min(reqs[r].prompt_len - done[r], left)
            windows.append((r, done[r], n))
            done[r] += n
            left -= n
            if done[r] == reqs[r].prompt_len:
                gone.append(r)
        running = [r for r in running if r not in gone]
        if windows:
            steps.append(windows)
            leave.append(gone)
        t += 1
    return steps, leave


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench --trace", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests in the trace")
    ap.add_argument("--rate", type=float, default=4.0, help="mean arrivals a step (Poisson)")
    ap.add_argument("--budget", type=int, default=8192, help="tokens a step (chunked prefill)")
    ap.add_argument("--hidden", type=int, default=3584, choices=[2048, 3584, 4096, 8192])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paths", nargs="*", choices=TRACE_PATHS, default=list(TRACE_PATHS))
    ap.add_argument("--out", type=Path, help="folder for trace.json and trace.md")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, shrink = ("cuda", 1) if cuda else ("cpu", 16)
    hidden = args.hidden if cuda else args.hidden // 8
    budget = args.budget if cuda else args.budget // shrink
    sg = vl = None
    if any(p.startswith(("sglang", "ours_sglang", "plugin_sglang")) for p in args.paths):
        from mmassembler.testing.engine_code import load_sglang

        sg = load_sglang()
    if any(p.startswith(("vllm", "ours_vllm", "plugin_vllm")) for p in args.paths):
        from mmassembler.testing.engine_code import load_vllm

        vl = load_vllm()
    reqs, weight = make_requests(args.requests, hidden, device, args.seed, shrink)
    steps, leave = schedule(reqs, args.rate, budget, args.seed)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    items = sum(len(r.items) for r in reqs.values())
    head = (f"{torch.cuda.get_device_name() if cuda else 'CPU (scaled sizes, CPU wall times)'}: "
            f"{len(reqs)} requests ({items} items), {len(steps)} steps of up to {budget} tokens, "
            f"hidden {hidden}, bf16")
    print(head, flush=True)
    results = {}
    with torch.no_grad():
        limits = dict(max_tokens=budget, max_requests=256)  # the engine's chunked-prefill budget
        for name, drv in drivers(reqs, weight, sg, vl, args.paths, limits):
            run_steps(drv, reqs, steps[:3], weight, check=True, sync=sync, leave=leave[:3])  # warm
            drv.finish(list(reqs))
            times = run_steps(drv, reqs, steps, weight, check=True, sync=sync, leave=leave)
            drv.close()
            results[name] = dict(host=summary(t[0] for t in times), wall=summary(t[1] for t in times))
            w = results[name]["wall"]
            print(f"  {name:20s} wall mean {w['mean']:8.0f}  p50 {w['p50']:8.0f}  p99 {w['p99']:8.0f} µs",
                  flush=True)
    engines = [n for n in ("sglang_routine", "vllm") if n in results]
    lines = [head, "", "| path | wall mean | wall p50 | wall p99 | host mean | host p99 | faster engine / ours "
             "(mean) | (p99) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    best = min(engines, key=lambda n: results[n]["wall"]["mean"]) if engines else None
    for name, r in results.items():
        ratio = ratio99 = "-"
        if best and not name.startswith(("sglang", "vllm")):
            ratio = f"{results[best]['wall']['mean'] / r['wall']['mean']:.2f}x"
            ratio99 = f"{results[best]['wall']['p99'] / r['wall']['p99']:.2f}x"
        lines.append(f"| {name} | {r['wall']['mean']:.0f} | {r['wall']['p50']:.0f} | {r['wall']['p99']:.0f} | "
                     f"{r['host']['mean']:.0f} | {r['host']['p99']:.0f} | {ratio} | {ratio99} |")
    text = "\n".join(lines)
    print(("\n" + text + f"\n(faster engine: {best})") if best else "\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                    python=platform.python_version(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    steps=len(steps), requests=len(reqs), items=items, faster_engine=best)
        (args.out / "trace.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
        (args.out / "trace.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
