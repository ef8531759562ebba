"""Benchmark scenarios: realistic chunked-prefill batches with precomputed embeddings.

A scenario is requests x items x tokens per item, with ``text`` tokens before each item
and after the last, a hidden size, and an optional chunk window (``chunk`` tokens from
``start``; whole prompts otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmassembler import Item, Request


@dataclass(frozen=True)
class Scenario:
    name: str
    requests: int
    items: int
    tokens: int  # placeholder tokens per item
    text: int  # text tokens before each item and after the last
    hidden: int
    chunk: int | None = None
    start: int = 0

    @property
    def prompt_len(self) -> int:
        return self.items * (self.tokens + self.text) + self.text


# The kernel scenarios (requests x items x tokens, text, hidden, chunk).
SCENARIOS = [
    Scenario("16x2x1296 t100 H3584", 16, 2, 1296, 100, 3584),
    Scenario("1x128x256 t2 H3584 c8192@4000", 1, 128, 256, 2, 3584, chunk=8192, start=4000),
    Scenario("64x4x64 t20 H4096", 64, 4, 64, 20, 4096),
    Scenario("4x1x4096 t50 H8192", 4, 1, 4096, 50, 8192),
    Scenario("1x1x256 t30 H2048", 1, 1, 256, 30, 2048),
    Scenario("8x3x1024 t64 H3584 c2048@1500", 8, 3, 1024, 64, 3584, chunk=2048, start=1500),
]

PLANNING_256 = Scenario("1x256x64 t4 H4096 (planning)", 1, 256, 64, 4, 4096)

# Scaling sweeps (issue: bench suite): multimodal rows, item count, hidden size.
ROWS_SWEEP = [Scenario(f"rows {n // 1024}k H4096", 1, max(1, n // 1024), min(n, 1024), 16, 4096)
              for n in (1024, 4096, 16384, 65536, 262144)]
ITEMS_SWEEP = [Scenario(f"items {k} x {65536 // k} H4096", 1, k, 65536 // k, 16, 4096)
               for k in (1, 4, 16, 64, 256, 1024)]
HIDDEN_SWEEP = [Scenario(f"hidden {h} 16x1024", 1, 16, 1024, 16, h)
                for h in (1024, 2048, 4096, 8192, 16384)]

SUITES = {
    "kernel": SCENARIOS + [PLANNING_256],
    "rows": ROWS_SWEEP,
    "items": ITEMS_SWEEP,
    "hidden": HIDDEN_SWEEP,
}


def scaled(sc: Scenario, rows: float, hidden: float) -> Scenario:
    """A smaller copy (CPU runs): tokens per item and text times ``rows``, hidden times ``hidden``."""
    from dataclasses import replace

    return replace(sc, tokens=max(1, int(sc.tokens * rows)), text=max(1, int(sc.text * rows)),
                   hidden=max(8, int(sc.hidden * hidden)),
                   chunk=None if sc.chunk is None else max(1, int(sc.chunk * rows)),
                   start=int(sc.start * rows), name=f"{sc.name} (x{rows:g} rows, x{hidden:g} H)")


@dataclass
class Built:
    """A scenario made concrete on a device."""

    scenario: Scenario
    requests: list
    input_ids: torch.Tensor
    weight: torch.Tensor
    out: torch.Tensor  # scatter-mode buffer, text rows already looked up
    num_mm_rows: int
    num_tokens: int
    prompts: list | None = None  # each request's whole prompt ids, on the device (walks)


def build(sc: Scenario, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
          vocab: int = 32000, seed: int = 0) -> Built:
    """Items carry precomputed embeddings (each its own tensor); placeholders hold
    out-of-vocabulary ids, as engines' hashes do."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, sc.hidden, generator=gen).to(device=device, dtype=dtype)
    lo = sc.start if sc.chunk is not None else 0
    hi = min(sc.prompt_len, lo + sc.chunk) if sc.chunk is not None else sc.prompt_len
    requests, ids, prompts, key = [], [], [], 0
    for _ in range(sc.requests):
        items, pos = [], 0
        prompt = torch.randint(0, vocab, (sc.prompt_len,), generator=gen)
        for _ in range(sc.items):
            pos += sc.text
            key += 1
            emb = torch.randn(sc.tokens, sc.hidden, generator=gen).to(device=device, dtype=dtype)
            items.append(Item(key, [(pos, pos + sc.tokens - 1)], embedding=emb))
            prompt[pos:pos + sc.tokens] = vocab + key  # an out-of-vocabulary placeholder id
            pos += sc.tokens
        requests.append(Request(items, lo, hi - lo, prompt_len=sc.prompt_len))
        ids.append(prompt[lo:hi])
        prompts.append(prompt.to(device))
    input_ids = torch.cat(ids).to(device)
    out = weight[input_ids.clamp(0, vocab - 1)]
    mm_rows = sum(max(0, min(e + 1, r.prefix_len + r.extend_len) - max(s, r.prefix_len))
                  for r in requests for it in r.items for s, e in it.spans)
    return Built(sc, requests, input_ids, weight, out, mm_rows, int(input_ids.shape[0]), prompts)
