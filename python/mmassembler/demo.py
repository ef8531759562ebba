"""The built-in demo: a synthetic chunked-prefill run with a small real image encoder.

Several requests, several images each (their sizes set their embedding rows), prefilled
in chunks that cut through images. Every step is assembled through the stateless API
(per backend) and through a resident ``Assembler`` (requests registered once, windows
per step), each with a cache, timed, and checked against the naive per-position oracle.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

import mmkernels
from mmassembler.api import assemble
from mmassembler.assembler import Assembler
from mmassembler.items import Item, Request
from mmassembler.cache import EmbeddingCache
from mmassembler.oracle import assemble_oracle

logger = logging.getLogger(__name__)


class TinyVisionEncoder(nn.Module):
    """Patch embedding, a few transformer layers and a 2x2 spatial merge.

    An image of ``h x w`` pixels gives ``(h // patch // 2) * (w // patch // 2)`` rows.
    """

    def __init__(self, hidden: int, width: int = 64, patch: int = 8, layers: int = 2):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width,
                                           batch_first=True, dropout=0.0)
        self.blocks = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.merge = nn.Linear(4 * width, hidden)

    @staticmethod
    def rows_for(h: int, w: int, patch: int = 8) -> int:
        return (h // patch // 2) * (w // patch // 2)

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``[3, h, w]`` -> ``[rows, hidden]``; a same-size batch ``[B, 3, h, w]`` -> ``[B, rows, H]``."""
        single = image.dim() == 3
        x = self.embed(image[None] if single else image)  # [B, C, gh, gw]
        b, c, gh, gw = x.shape
        x = self.blocks(x.flatten(2).transpose(1, 2))  # [B, gh*gw, C]
        x = x.reshape(b, gh // 2, 2, gw // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, 4 * c)
        x = self.merge(x)
        return x[0] if single else x


@dataclass
class DemoConfig:
    requests: int = 6
    hidden: int = 256
    vocab: int = 1000
    chunk: int = 64
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


IMAGE_SIZES = ((32, 32), (64, 32), (64, 64), (48, 80), (96, 96), (128, 64), (128, 128))


def build_prompts(cfg: DemoConfig, gen: torch.Generator):
    """Per request: its items (with their pixels) and the prompt's token ids."""
    prompts = []
    key = 0
    for _ in range(cfg.requests):
        pos, items = 0, []
        for _ in range(int(torch.randint(2, 5, (1,), generator=gen))):
            pos += int(torch.randint(3, 30, (1,), generator=gen))  # text before the image
            h, w = IMAGE_SIZES[int(torch.randint(len(IMAGE_SIZES), (1,), generator=gen))]
            rows = TinyVisionEncoder.rows_for(h, w)
            key += 1
            pixels = torch.randn(3, h, w, generator=gen).to(cfg.device)
            items.append(Item(key, [(pos, pos + rows - 1)], data=pixels))
            pos += rows
        pos += int(torch.randint(3, 30, (1,), generator=gen))
        ids = torch.randint(0, cfg.vocab, (pos,), generator=gen)
        for it in items:  # engines put hashes at placeholders: out of vocabulary, clamped
            s, e = it.spans[0]
            ids[s:e + 1] = 10**9 + it.key
        prompts.append((items, ids))
    return prompts


def _time(fn, device: str, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def run_demo(cfg: DemoConfig) -> list[dict]:
    """Prefill every prompt chunk by chunk; return one row of results per step."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    encoder = TinyVisionEncoder(cfg.hidden).to(cfg.device).eval()
    weight = torch.randn(cfg.vocab, cfg.hidden, generator=gen).to(cfg.device, cfg.dtype)
    prompts = build_prompts(cfg, gen)

    calls = []

    def encode_images(items):
        calls.append(len(items))
        return [encoder(it.data) for it in items]  # one tensor per item: rows as returned

    backends = ["torch"]
    dev = torch.device(cfg.device)
    try:
        backends.append(mmkernels.resolve_backend("triton", dev))
    except mmkernels.BackendUnavailableError as exc:
        logger.info("triton backend not used: %s", exc)
    cache = EmbeddingCache(64 << 20)
    resident = Assembler(weight=weight, max_tokens=cfg.chunk * len(prompts), max_requests=len(prompts),
                         encoders={"image": encode_images}, cache=EmbeddingCache(64 << 20))
    handles = [resident.add_request(items, prompt_len=len(ids)) for items, ids in prompts]
    done = [0] * len(prompts)
    rows = []
    step = 0
    while any(d < len(ids) for d, (_, ids) in zip(done, prompts)):
        reqs, chunk_ids = [], []
        for r, (items, ids) in enumerate(prompts):
            extend = min(cfg.chunk, len(ids) - done[r])
            reqs.append(Request(items, done[r], extend, prompt_len=len(ids)))
            chunk_ids.append(ids[done[r]:done[r] + extend])
        input_ids = torch.cat(chunk_ids).to(cfg.device)
        n_calls = len(calls)
        results, times = {}, {}
        # the first call encodes and fills the cache; timed calls then read the cache
        results["torch"] = assemble(reqs, input_ids, weight=weight, encoders={"image": encode_images},
                                    cache=cache, backend="torch")
        encoder_calls = len(calls) - n_calls
        for be in backends:
            api_backend = "torch" if be == "torch" else "triton"
            results[be] = assemble(reqs, input_ids, weight=weight, cache=cache,
                                   encoders={"image": encode_images}, backend=api_backend)
            times[be] = _time(lambda: assemble(reqs, input_ids, weight=weight, cache=cache,
                                               encoders={"image": encode_images},
                                               backend=api_backend), cfg.device)
        # the resident Assembler: its first call resolves (and encodes) what the windows reach
        windows = (handles, [r.prefix_len for r in reqs], [r.extend_len for r in reqs])
        results["assembler"] = resident.assemble(*windows, input_ids)
        times["assembler"] = _time(lambda: resident.assemble(*windows, input_ids), cfg.device)
        want, _ = assemble_oracle(reqs, input_ids, lambda it: encoder(it.data), weight=weight)
        mm_rows = sum(1 for r in reqs for it in r.items for s, e in it.spans
                      for p in range(s, e + 1) if r.prefix_len <= p < r.prefix_len + r.extend_len)
        rows.append(dict(step=step, requests=sum(1 for r in reqs if r.extend_len), tokens=len(input_ids),
                         mm_rows=mm_rows, encoder_calls=encoder_calls,
                         times_ms=times, match=all(torch.equal(v, want) for v in results.values())))
        for r, req in enumerate(reqs):
            done[r] += req.extend_len
        step += 1
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of the demo's steps: per step the best-of-three time of each of
    our paths (all of them ours: the stateless call on each backend and the Assembler)."""
    backends = list(rows[0]["times_ms"]) if rows else []
    names = {"torch": "stateless (torch) ms", "triton": "stateless (triton) ms",
             "interpreter": "stateless (interpreter) ms", "assembler": "Assembler ms"}
    head = ["step", "requests", "tokens", "mm rows", "enc calls"] + [names.get(b, f"{b} ms") for b in backends] + [
        "match"]
    lines = [head]
    for r in rows:
        lines.append([str(r["step"]), str(r["requests"]), str(r["tokens"]), str(r["mm_rows"]),
                      str(r["encoder_calls"])] + [f"{r['times_ms'][b]:.3f}" for b in backends]
                     + ["yes" if r["match"] else "NO"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
