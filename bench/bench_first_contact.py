"""Host time and Python calls per new item: a request's whole life on our own APIs.

    python -m bench.bench_first_contact [--shapes 1x256 256x1 64x4 1x1] [--out DIR]

A life is ``add_requests`` + the step that first reaches every item + ``remove_requests``
through the ``Assembler``, and one stateless ``assemble`` call on new ``Request`` and
``Item`` objects. Items carry precomputed embeddings, or none (``encoded``: the encoder
returns tensors made beforehand, so its own cost is a list lookup). Host time is call to
return with the device idle before each life (median of ``--repeat`` lives, new objects
every time); the figure per item divides by the items. Python calls are counted with
``sys.setprofile`` (Python and C calls) with the kernel launch stubbed, as the tests count
them. On a CPU the torch backend runs and its reference copy is stubbed out of the timing
(it is the CPU fallback, not the path whose host cost is measured), and the table says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mmassembler import Assembler, EmbeddingCache, Item, Request, assemble
from mmassembler.testing import count_calls

HIDDEN, ROWS = 4096, 64


def _setup(r: int, k: int, encoded: bool, device: str):
    pool = [torch.randn(ROWS, HIDDEN, device=device, dtype=torch.bfloat16) for _ in range(r * k)]
    enc = {"image": lambda items: [it.data for it in items]} if encoded else None
    weight = torch.randn(1000, HIDDEN, device=device, dtype=torch.bfloat16)
    step = k * (ROWS + 2) + 2
    ids = torch.zeros(r * step, dtype=torch.int64, device=device)
    asm = Assembler(weight=weight, max_tokens=r * step, max_requests=max(r, 1), max_items=r * k + 8,
                    encoders=enc, cache=EmbeddingCache(4 << 30) if encoded else None)
    cache = EmbeddingCache(4 << 30) if encoded else None
    keys = iter(range(1, 1 << 62))
    p, e = np.zeros(r, np.int64), np.full(r, step, np.int64)

    def new_life(path: str):
        reqs = []
        for i in range(r):
            items = []
            for j in range(k):
                s = 2 + j * (ROWS + 2)
                t = pool[i * k + j]
                items.append(Item(next(keys), [(s, s + ROWS - 1)], embedding=None if encoded else t, data=t))
            reqs.append((items, step))
        if path == "Assembler":
            def life():
                h = asm.add_requests(reqs)
                asm.assemble(h, p, e, ids)
                asm.remove_requests(h)
        else:
            rq = [Request(items, 0, step, n) for items, n in reqs]

            def life():
                assemble(rq, ids, weight=weight, encoders=enc, cache=cache)
        return life

    return new_life, asm


def measure(shape: str, encoded: bool, device: str, repeat: int) -> list[dict]:
    import mmassembler.core as core
    from mmkernels.step_op import StepOp

    r, k = map(int, shape.split("x"))
    new_life, _ = _setup(r, k, encoded, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for path in ("Assembler", "stateless"):
        for _ in range(3):
            new_life(path)()  # warm: compile, allocate, grow the stateless pool
        lives = [new_life(path) for _ in range(repeat)]
        real_ref, launch = core.assemble_step_ref, StepOp.launch
        if device != "cuda":
            core.assemble_step_ref = lambda out, *a, **kw: out
        samples = []
        try:
            for life in lives:
                sync()
                t0 = time.perf_counter()
                life()
                samples.append(time.perf_counter() - t0)
            sync()
            core.assemble_step_ref = lambda out, *a, **kw: out
            StepOp.launch = lambda *a, **kw: None
            calls = count_calls(new_life(path))
        finally:
            core.assemble_step_ref, StepOp.launch = real_ref, launch
        host = 1e6 * statistics.median(samples)
        rows.append(dict(shape=shape, items=r * k, path=path, source="encoded" if encoded else "precomputed",
                         host_us=host, host_us_per_item=host / (r * k), calls_per_item=calls / (r * k)))
        print(f"{shape:>7} {rows[-1]['source']:>11} {path:>9}: {host:9.1f} µs a life, "
              f"{host / (r * k):6.2f} µs and {calls / (r * k):5.1f} calls per item", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["1x256", "256x1", "64x4", "1x1"],
                    help="requests x items per request")
    ap.add_argument("--repeat", type=int, default=50, help="lives timed per figure (median)")
    ap.add_argument("--out", type=Path, help="folder for first_contact.json")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'host'})"
    print(f"{name}: host µs per new item (register + first step + remove), hidden {HIDDEN}, {ROWS} rows "
          f"an item{'' if device == 'cuda' else '; CPU run: torch backend, its reference copy stubbed'}")
    rows = [row for shape in args.shapes for encoded in (False, True)
            for row in measure(shape, encoded, device, args.repeat)]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = dict(device=name, torch=torch.__version__, python=platform.python_version())
        (args.out / "first_contact.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
