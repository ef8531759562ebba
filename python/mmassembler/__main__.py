"""Command line: ``python -m mmassembler demo`` runs the built-in chunked-prefill demo;
``python -m mmassembler info`` says what would run here; ``--version`` prints the version."""

from __future__ import annotations

import argparse
import logging
import sys

import torch


def info() -> str:
    """torch, Triton, the device, the backend ``auto`` picks and why, the Triton cache."""
    import os
    import platform

    import mmkernels
    from mmassembler import __version__
    from mmkernels import backend as be

    lines = [f"mmassembler {__version__} (mmkernels {mmkernels.__version__}), Python {platform.python_version()}",
             f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
        try:
            from triton import knobs

            cache = knobs.cache.dir
        except Exception:  # noqa: BLE001 - older Triton: its default place
            cache = os.environ.get("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))
        lines.append(f"Triton cache: {cache}")
    except ImportError:
        lines.append("triton: not installed (the torch backend runs)")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    lines.append(f"device: {torch.cuda.get_device_name() if cuda else 'CPU'}"
                 + (f" (CUDA {torch.version.cuda})" if cuda and torch.version.cuda else "")
                 + (f" (HIP {torch.version.hip})" if cuda and torch.version.hip else ""))
    chosen = mmkernels.resolve_backend("auto", device)
    override = os.environ.get(be.ENV_OVERRIDE)
    if override:
        why = f"{be.ENV_OVERRIDE}={override}"
    elif chosen == "triton":
        why = "compiled Triton on a GPU"
    elif device.type == "cuda":
        why = be._gpu_triton_reason() or "no compiled Triton"
    else:
        why = "a CPU: the Triton interpreter is for tests (TRITON_INTERPRET=1), torch is faster here"
    lines.append(f"backend auto: {chosen} ({why})")
    lines.append(f"kernels interpreted: {mmkernels.kernels_interpreted()}")
    return "\n".join(lines)


def _positive(flag: str, most: int):
    """An argparse type: an int from 1 to ``most``, else a one-line error naming ``flag``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a whole number, got {text!r}") from None
        if not 1 <= value <= most:
            raise argparse.ArgumentTypeError(f"{flag} takes a number from 1 to {most}, got {value}")
        return value
    return parse


def _device(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N``."""
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"--device takes cpu, cuda or cuda:N, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    from mmassembler import __version__

    parser = argparse.ArgumentParser(prog="mmassembler", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mmassembler {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="torch, Triton, the device and the backend 'auto' picks here")
    demo = sub.add_parser("demo", help="assemble a synthetic chunked-prefill batch and check it")
    demo.add_argument("--requests", type=_positive("--requests", 1024), default=6, help="prompts prefilled together")
    demo.add_argument("--hidden", type=_positive("--hidden", 1 << 16), default=256, help="embedding width")
    demo.add_argument("--chunk", type=_positive("--chunk", 1 << 16), default=64,
                      help="prefill tokens per request per step")
    demo.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                      help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                      help="embedding dtype")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts and encoder")
    demo.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("mmassembler demo: --device cuda, but torch sees no CUDA device here (try --device cpu)")
        return 2

    from mmassembler.demo import DemoConfig, format_table, run_demo

    cfg = DemoConfig(requests=args.requests, hidden=args.hidden, chunk=args.chunk, seed=args.seed,
                     device=args.device, dtype=getattr(torch, args.dtype))
    print(f"mmassembler demo: {cfg.requests} requests, hidden {cfg.hidden}, {args.dtype}, "
          f"chunk {cfg.chunk} tokens/request, device {cfg.device}; each step assembled by the stateless "
          "assemble (per backend) and a resident Assembler, checked against the per-position oracle ...",
          flush=True)
    rows = run_demo(cfg)
    print(format_table(rows))
    ok = all(r["match"] for r in rows)
    print("all steps match the per-position oracle" if ok else "MISMATCH against the oracle")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
