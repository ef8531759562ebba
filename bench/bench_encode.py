"""Encoder batching: one batched encoder call for the whole batch vs one call per request.

    python -m bench.bench_encode [--device cuda] [--save_path DIR]

A real ``torch.nn`` encoder (patch embedding, transformer layers, 2x2 spatial merge; rows
follow image size), 16 requests x 2 images, every image a cache miss. Both paths go
through ``assemble`` and must give the same embeddings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from mmassembler import Item, Request, assemble, assemble_oracle
from mmassembler.demo import TinyVisionEncoder

SIZES = ((224, 224), (336, 224), (224, 448), (448, 448))


def build(device: str, requests: int = 16, images: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    reqs, key = [], 0
    for _ in range(requests):
        pos, items = 0, []
        for _ in range(images):
            pos += 20
            h, w = SIZES[int(torch.randint(len(SIZES), (1,), generator=g))]
            rows = TinyVisionEncoder.rows_for(h, w, patch=14)
            key += 1
            pixels = torch.randn(3, h, w, generator=g).to(device)
            items.append(Item(key, [(pos, pos + rows - 1)], data=pixels))
            pos += rows
        reqs.append(Request(items, 0, pos + 20))
    n = sum(r.extend_len for r in reqs)
    return reqs, torch.randint(0, 1000, (n,), generator=g).to(device)


def make_encoder_fn(model: TinyVisionEncoder, counter: list, seen: dict | None = None):
    """Encode a list of items: same-size images go through the model together (``seen``
    records each item's rows, so a check can compare with what this encoder returned:
    batches of other compositions round differently)."""

    def encode(items):
        counter.append(len(items))
        groups = defaultdict(list)
        for i, it in enumerate(items):
            groups[tuple(it.data.shape)].append(i)
        out = [None] * len(items)
        for idx in groups.values():
            rows = model(torch.stack([items[i].data for i in idx]))
            for j, i in enumerate(idx):
                out[i] = rows[j]
        if seen is not None:
            seen.update((it.key, t) for it, t in zip(items, out))
        return out

    return encode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--save_path", default=None)
    args = ap.parse_args(argv)
    dev = args.device
    torch.manual_seed(0)
    model = TinyVisionEncoder(args.hidden, width=256, patch=14, layers=4).to(dev).eval()
    if dev == "cuda":
        model = model.to(torch.bfloat16)
    reqs, ids = build(dev)
    for r in reqs:
        for it in r.items:
            object.__setattr__(it, "data", it.data.to(next(model.parameters()).dtype))
    weight = torch.randn(1000, args.hidden, device=dev, dtype=next(model.parameters()).dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def batched(calls, seen=None):
        return assemble(reqs, ids, weight=weight, encoders={"image": make_encoder_fn(model, calls, seen)})

    def per_request(calls, seen=None):
        outs, row = [], 0
        for r in reqs:
            n = r.extend_len
            outs.append(assemble([r], ids[row:row + n], weight=weight,
                                 encoders={"image": make_encoder_fn(model, calls, seen)}))
            row += n
        return torch.cat(outs)

    results = {}
    for name, fn in (("batched", batched), ("per_request", per_request)):
        seen: dict = {}
        out = fn([], seen)  # checked: bit for bit what the encoder returned, placed by position
        want, _ = assemble_oracle(reqs, ids.cpu(), lambda it: seen[it.key].cpu(), weight=weight.cpu())
        assert torch.equal(out.cpu(), want), f"{name}: differs from the encoder's own rows"
        fn([])  # warm-up
        samples, calls = [], []
        for _ in range(args.repeat):
            calls = []
            sync()
            t0 = time.perf_counter()
            fn(calls)
            sync()
            samples.append(time.perf_counter() - t0)
        results[name] = dict(encoder_calls=len(calls), wall_ms=1e3 * statistics.median(samples))
    print(f"{len(reqs)} requests x 2 images, all cache misses, hidden {args.hidden}, {dev}")
    for name, r in results.items():
        print(f"{name:12s} encoder calls {r['encoder_calls']:3d}   wall {r['wall_ms']:8.2f} ms")
    print(f"speed-up {results['per_request']['wall_ms'] / results['batched']['wall_ms']:.2f}x")
    if args.save_path:
        Path(args.save_path).mkdir(parents=True, exist_ok=True)
        Path(args.save_path, "bench_encode.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
