"""Hypothesis strategies: random chunked-prefill batches and raw segment tables.

Batches have several requests, items with one or more spans (optionally interleaved
with another item's), optional embed masks, chunk windows at random cut points
(including empty ones), precomputed sources of mixed dtypes and row strides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from mmassembler import Item, Request

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_rows(rows: int, cols: int, dtype: torch.dtype, strided: bool, gen: torch.Generator,
                device: str = "cpu") -> torch.Tensor:
    """Random finite values; with ``strided`` a column slice of a wider tensor (row stride > cols)."""
    width = cols + (5 if strided else 0)
    t = (torch.randn(rows, width, generator=gen) * 4).to(dtype)
    return t.to(device)[:, :cols]


@dataclass
class Batch:
    requests: list
    input_ids: torch.Tensor
    hidden: int
    ds_cols: int
    out_dtype: torch.dtype
    vocab: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@st.composite
def batches(draw, *, max_requests: int = 16, max_items: int = 6, max_hidden: int = 300,
            deepstack: bool = False, device: str = "cpu", max_span: int = 8) -> Batch:
    """A random batch whose items all carry precomputed embeddings."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hidden = draw(st.integers(1, max_hidden))
    ds_cols = hidden * draw(st.integers(1, 3)) if deepstack else 0
    out_dtype = draw(st.sampled_from(DTYPES))
    key = 0
    requests = []
    for _ in range(draw(st.integers(1, max_requests))):
        n_items = draw(st.integers(0, max_items))
        blocks = []  # (item index, span length)
        for i in range(n_items):
            for _ in range(draw(st.integers(1, 3))):
                blocks.append((i, draw(st.integers(1, max_span))))
        if draw(st.booleans()):  # interleave the spans of different items
            blocks = draw(st.permutations(blocks))
        pos = draw(st.integers(0, 4))
        spans = [[] for _ in range(n_items)]
        for i, length in blocks:
            spans[i].append((pos, pos + length - 1))
            pos += length + draw(st.integers(0, 4))
        prompt_len = pos + draw(st.integers(0, 4))
        items = []
        for i in range(n_items):
            positions = sum(e - s + 1 for s, e in spans[i])
            mask = None
            if draw(st.integers(0, 3)) == 0:
                mask = [draw(st.booleans()) for _ in range(positions)]
            rows = positions if mask is None else sum(mask)
            width = hidden + (ds_cols if draw(st.integers(0, 3)) else 0) if deepstack else hidden
            emb = random_rows(rows, width, draw(st.sampled_from(DTYPES)), draw(st.booleans()), gen,
                              device)
            key += 1
            items.append(Item(key, spans[i], embedding=emb, embed_mask=mask))
        prefix = draw(st.integers(0, prompt_len))
        extend = draw(st.integers(0, prompt_len - prefix))
        requests.append(Request(items, prefix, extend, prompt_len=prompt_len))
    n = sum(r.extend_len for r in requests)
    vocab = draw(st.integers(1, 50))
    ids = torch.randint(-3, vocab + 3, (n,), generator=gen).to(device)
    return Batch(requests, ids, hidden, ds_cols, out_dtype, vocab)


@st.composite
def segment_tables(draw, *, max_hidden: int = 300, max_sources: int = 5, max_rows: int = 40,
                   deepstack: bool = False):
    """(num_out_rows, hidden, ds_cols, [(rows, width, dtype, strided)], segments) with
    disjoint destinations, built from a random partition of the output rows."""
    hidden = draw(st.integers(1, max_hidden))
    ds_cols = draw(st.integers(1, 2 * hidden)) if deepstack else 0
    n_src = draw(st.integers(1, max_sources))
    specs = [(draw(st.integers(1, max_rows)),
              hidden + (ds_cols if deepstack and draw(st.booleans()) else 0),
              draw(st.sampled_from(DTYPES)), draw(st.booleans())) for _ in range(n_src)]
    num_out = draw(st.integers(0, max_rows * 2))
    segments, row = [], 0
    while row < num_out:
        length = draw(st.integers(1, max(1, min(num_out - row, max_rows))))
        if draw(st.booleans()):
            s = draw(st.integers(0, n_src - 1))
            n = min(length, specs[s][0])
            r0 = draw(st.integers(0, specs[s][0] - n))
            segments.append((s, r0, row, n))
            length = n
        row += length
    if segments and draw(st.booleans()):
        segments = draw(st.permutations(segments))  # the ops sort by destination themselves
    return num_out, hidden, ds_cols, specs, segments
