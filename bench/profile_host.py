"""Where a first contact's host time goes: a request's whole life (register, the step that
first reaches its items, remove) through the ``Assembler``, the stateless ``assemble`` and
the SGLang drop-in, profiled with cProfile.

    python -m bench.profile_host [--scenario SUBSTR ...] [--encoded] [--calls N] [--top K]

Prints, per scenario and path, the host µs per new item (median of ``--calls`` lives,
device idle before each, new ``Item`` objects every time) and the functions that took the
most time (cumulative), so a closing note can show where a missed target goes. On a CPU
the torch backend runs (its reference copy is part of the figure); say so when quoting.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import numpy as np
import torch

from bench.bench_resident import RESIDENT_SCENARIOS
from bench.scenarios import build, scaled
from mmassembler import Assembler, EmbeddingCache, Item, Request, assemble


_fresh = iter(range(1, 1 << 40))


def lives(b, encoded: bool, copies: int):
    """``copies`` sets of the scenario's requests as new ``Item``s with keys never seen
    (encoded: no embedding, so every item is a cache miss and the encoder runs)."""
    return [[[Item((next(_fresh), it.key), it.spans, it.modality, None if encoded else it.embedding,
                   it.embedding, it.embed_mask) for it in r.items] for r in b.requests]
            for c in range(copies)]


def encoder(items):
    return [it.data for it in items]


def paths(b, encoded: bool):
    """name -> function(items of each request) running one whole life."""
    dev = b.input_ids.device
    p = np.array([r.prefix_len for r in b.requests])
    e = np.array([r.extend_len for r in b.requests])
    n_items = sum(len(r.items) for r in b.requests)
    enc = {"image": encoder} if encoded else None
    cache = EmbeddingCache(8 << 30) if encoded else None
    asm = Assembler(weight=b.weight, max_tokens=b.num_tokens, max_requests=len(b.requests),
                    max_items=n_items + 1, max_runs=4 * n_items + 4, encoders=enc, cache=cache)

    def resident(items):
        h = asm.add_requests([(its, r.prompt_len) for its, r in zip(items, b.requests)])
        asm.assemble(h, p, e, b.input_ids)
        asm.remove_requests(h)

    def stateless(items):
        reqs = [Request(its, r.prefix_len, r.extend_len, r.prompt_len) for its, r in zip(items, b.requests)]
        assemble(reqs, b.input_ids, weight=b.weight, encoders=enc, cache=cache)

    del dev
    return {"Assembler": resident, "stateless": stateless}


def profile(b, encoded: bool, calls: int, top: int, sort: str = "cumulative") -> None:
    sync = torch.cuda.synchronize if b.input_ids.is_cuda else (lambda: None)
    n_items = sum(len(r.items) for r in b.requests)
    for name, fn in paths(b, encoded).items():
        sets = lives(b, encoded, calls + 3)
        for items in sets[:3]:
            fn(items)  # warm: compile, allocate
        samples = []
        for items in sets[3:]:
            sync()
            t0 = time.perf_counter()
            fn(items)
            samples.append(time.perf_counter() - t0)
        sync()
        us = 1e6 * statistics.median(samples)
        print(f"\n{b.scenario.name} {'encoded' if encoded else 'precomputed'} {name}: "
              f"{us:.0f} µs host a life, {us / max(1, n_items):.2f} µs per item")
        pr = cProfile.Profile()
        sets = lives(b, encoded, calls)
        pr.enable()
        for items in sets:
            fn(items)
        pr.disable()
        sync()
        st = pstats.Stats(pr, stream=io.StringIO()).stats
        col = {"tottime": 2, "cumulative": 3, "ncalls": 1}[sort]
        print(f"  {'µs a life':>10} {'cum µs':>9} {'calls':>7}  function ({sort}, under cProfile)")
        for (file, line, name), v in sorted(st.items(), key=lambda kv: -kv[1][col])[:top]:
            where = f"{file.split('/')[-1]}:{line}" if line else "~"
            print(f"  {1e6 * v[2] / calls:10.1f} {1e6 * v[3] / calls:9.1f} {v[1] / calls:7.1f}  {where} {name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", nargs="*", default=["64x4x64", "256x1x64", "1x256x64"],
                    help="substrings of scenario names (bench/scenarios.py)")
    ap.add_argument("--encoded", action="store_true", help="items carry no embedding: the encoder runs")
    ap.add_argument("--calls", type=int, default=30, help="lives timed and profiled per path")
    ap.add_argument("--top", type=int, default=25, help="functions listed per profile")
    ap.add_argument("--sort", default="cumulative", choices=["cumulative", "tottime", "ncalls"])
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        print("CPU run: the torch backend, scenarios scaled to 1/16 of their rows and 1/4 of hidden")
    for sc in RESIDENT_SCENARIOS:
        if any(k in sc.name for k in args.scenario):
            profile(build(sc if cuda else scaled(sc, 1 / 16, 1 / 4), device="cuda" if cuda else "cpu"),
                    args.encoded, args.calls, args.top, args.sort)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
