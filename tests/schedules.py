"""Hypothesis strategy: random multi-step chunked-prefill schedules for the ``Assembler``.

Requests are added and removed between steps; each step gives some live requests a
window that advances by a random amount (0 included), sometimes moves back (an engine
recomputing a preempted request), and the rest sit the step out. Items have one or more
spans (interleaved with another item's or not), optional embed masks, and precomputed
(mixed dtypes, strided), cached or encoded sources; keys repeat across requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from mmassembler import Item

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def encoded_rows(key: tuple, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """What the test encoder returns for ``key = (k, rows, width)``: the same rows every time."""
    k, rows, width = key
    gen = torch.Generator().manual_seed(k * 100_003 + rows * 101 + width)
    return (torch.randn(rows, width, generator=gen) * 4).to(dtype).to(device)


@dataclass
class Step:
    """``(request index, prefix, extend)`` windows, and requests added/removed before it."""

    windows: list
    add: list = field(default_factory=list)
    remove: list = field(default_factory=list)


@dataclass
class Schedule:
    requests: list  # (items, prompt_len) per request
    steps: list
    hidden: int
    ds_cols: int
    dtype: torch.dtype
    fused: bool
    vocab: int
    enc_dtype: torch.dtype
    seed: int


@st.composite
def request_items(draw, *, hidden, ds_cols, key_pool, gen, device, max_items=4, max_span=6):
    """One request's items and prompt length."""
    n = draw(st.integers(0, max_items))
    blocks = [(i, draw(st.integers(1, max_span))) for i in range(n) for _ in range(draw(st.integers(1, 3)))]
    if draw(st.booleans()):
        blocks = draw(st.permutations(blocks))  # interleave items' spans
    pos = draw(st.integers(0, 3))
    spans = [[] for _ in range(n)]
    for i, length in blocks:
        spans[i].append((pos, pos + length - 1))
        pos += length + draw(st.integers(0, 3))
    items = []
    for i in range(n):
        positions = sum(e - s + 1 for s, e in spans[i])
        mask = [draw(st.booleans()) for _ in range(positions)] if draw(st.integers(0, 4)) == 0 else None
        rows = positions if mask is None else sum(mask)
        width = hidden + (ds_cols if ds_cols and draw(st.integers(0, 3)) else 0)
        if draw(st.booleans()):
            dtype = draw(st.sampled_from(DTYPES))
            strided = draw(st.booleans())
            emb = (torch.randn(rows, width + 3 * strided, generator=gen) * 4).to(dtype).to(device)
            items.append(Item(draw(st.integers(10_000, 10**9)), spans[i], embedding=emb[:, :width],
                              embed_mask=mask))
        else:  # encoded (or cached): the key fixes rows and width, so repeats agree
            key = (draw(st.sampled_from(key_pool)), rows, width)
            items.append(Item(key, spans[i], modality="image", embed_mask=mask))
    return items, pos + draw(st.integers(0, 3))


@st.composite
def schedules(draw, *, device="cpu", max_requests=4, max_steps=5, max_hidden=40, deepstack=None):
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    hidden = draw(st.integers(1, max_hidden))
    use_ds = draw(st.booleans()) if deepstack is None else deepstack
    ds_cols = hidden * draw(st.integers(1, 2)) if use_ds else 0
    key_pool = list(range(1, 7))
    requests = [draw(request_items(hidden=hidden, ds_cols=ds_cols, key_pool=key_pool, gen=gen,
                                   device=device))
                for _ in range(draw(st.integers(1, max_requests)))]
    cursors = {}
    steps = []
    pending = list(range(len(requests)))
    for _ in range(draw(st.integers(1, max_steps))):
        step = Step([])
        for r in list(cursors):
            if len(cursors) > 1 and draw(st.integers(0, 5)) == 0:
                step.remove.append(r)
                del cursors[r]
        while pending and (not cursors or draw(st.booleans())):
            r = pending.pop(0)
            step.add.append(r)
            cursors[r] = 0
        for r, cur in cursors.items():
            if draw(st.integers(0, 3)) == 0:
                continue  # not scheduled this step
            prompt = requests[r][1]
            if draw(st.integers(0, 6)) == 0:
                cur = draw(st.integers(0, cur))  # preempted: recompute from an earlier position
            extend = draw(st.integers(0, prompt - cur))
            step.windows.append((r, cur, extend))
            cursors[r] = cur + extend
        if step.windows and draw(st.booleans()):
            step.windows = draw(st.permutations(step.windows))
        steps.append(step)
    return Schedule(requests, steps, hidden, ds_cols, draw(st.sampled_from(DTYPES)),
                    draw(st.booleans()), draw(st.integers(1, 40)), draw(st.sampled_from(DTYPES)), seed)
