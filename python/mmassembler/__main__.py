"""Command line: ``python -m mmassembler demo`` runs the built-in chunked-prefill demo."""

from __future__ import annotations

import argparse
import logging
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmassembler", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="assemble a synthetic chunked-prefill batch and check it")
    demo.add_argument("--requests", type=int, default=6)
    demo.add_argument("--hidden", type=int, default=256)
    demo.add_argument("--chunk", type=int, default=64, help="prefill tokens per request per step")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    from mmassembler.demo import DemoConfig, format_table, run_demo

    cfg = DemoConfig(requests=args.requests, hidden=args.hidden, chunk=args.chunk, seed=args.seed,
                     device=args.device, dtype=getattr(torch, args.dtype))
    rows = run_demo(cfg)
    print(f"mmassembler demo: {cfg.requests} requests, hidden {cfg.hidden}, {args.dtype}, "
          f"chunk {cfg.chunk} tokens/request, device {cfg.device}")
    print(format_table(rows))
    ok = all(r["match"] for r in rows)
    print("all steps match the per-position oracle" if ok else "MISMATCH against the oracle")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
