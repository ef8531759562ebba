"""The planner: items ∩ chunk windows -> segments, position-driven, O(items) host work.

A segment ``(planned item, item first row, output first row, rows)`` copies consecutive
embedding rows to consecutive output rows. Each item's runs (``ItemLayout``) are
clipped to its request's window with vectorised numpy: no per-token Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmassembler.batch import Item, ItemLayout, Request
from mmassembler.errors import ChunkWindowError, SpanError


@dataclass(frozen=True)
class PlannedItem:
    """An item that has at least one embedding row inside its request's chunk."""

    request: int
    item: Item
    layout: ItemLayout


@dataclass(frozen=True)
class Plan:
    """What a batch reads: the planned items and the segments that place their rows.

    ``segments[:, 0]`` indexes ``items``; rows are sorted by output row.
    """

    items: list[PlannedItem]
    segments: np.ndarray  # int64 [S, 4]
    num_tokens: int
    request_starts: np.ndarray  # output row where each request's chunk begins

    @property
    def num_mm_rows(self) -> int:
        return int(self.segments[:, 3].sum()) if len(self.segments) else 0


def _check_window(r: int, req: Request) -> tuple[int, int]:
    for name in ("prefix_len", "extend_len"):
        v = getattr(req, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ChunkWindowError(f"{name} must be a non-negative int, got {v!r}", request=r)
    lo, hi = int(req.prefix_len), int(req.prefix_len) + int(req.extend_len)
    if req.prompt_len is not None and hi > req.prompt_len:
        raise ChunkWindowError(f"chunk [{lo}, {hi}) runs past the prompt of {req.prompt_len} "
                               "positions", request=r)
    return lo, hi


def check_request_items(r: int, req: Request) -> list[ItemLayout]:
    """Check every item's spans and that items of the request never share a position."""
    layouts = [item._layout or item.layout(r) for item in req.items]
    if req.prompt_len is not None:
        for item, lay in zip(req.items, layouts):
            if lay.last >= req.prompt_len:
                raise SpanError(f"span ends at {lay.last}, past the prompt of {req.prompt_len} "
                                "positions", request=r, item_key=item.key)
    if len(layouts) > 1 and not all(a.last < b.first for a, b in zip(layouts, layouts[1:])):
        order = sorted(range(len(layouts)), key=lambda i: layouts[i].first)
        disjoint = all(layouts[order[i]].last < layouts[order[i + 1]].first
                       for i in range(len(order) - 1))
        if not disjoint:  # interleaved items: compare their spans one by one
            _check_interleaved(r, req)
    return layouts


def _check_interleaved(r: int, req: Request) -> None:
    spans = [(int(s), int(e), item.key) for item in req.items for s, e in item.spans]
    spans.sort()
    for (s0, e0, k0), (s1, e1, k1) in zip(spans, spans[1:]):
        if s1 <= e0:
            raise SpanError(f"span ({s1}, {e1}) overlaps span ({s0}, {e0}) of item {k0}",
                            request=r, item_key=k1)


SMALL_RUNS = 32  # up to this many runs, plain Python clips faster than numpy's fixed costs


def plan_batch(requests: Sequence[Request], *, small_runs: int = SMALL_RUNS) -> Plan:
    """Check the requests and cut every item's rows to its request's chunk.

    Items wholly in the prefix or the future, and items whose positions in the chunk
    all keep their text embedding, are not planned (so never read nor encoded).
    ``small_runs`` picks the plain-Python path for small batches (tests force both).
    """
    planned_items: list[PlannedItem] = []
    run_blocks: list[np.ndarray] = []
    win_lo, win_hi, base = [], [], []
    starts = np.zeros(len(requests), dtype=np.int64)
    row = 0
    for r, req in enumerate(requests):
        lo, hi = _check_window(r, req)
        layouts = check_request_items(r, req)
        starts[r] = row
        for item, lay in zip(req.items, layouts):
            if lay.last < lo or lay.first >= hi or lay.num_rows == 0:
                continue
            planned_items.append(PlannedItem(r, item, lay))
            run_blocks.append(lay.runs)
            win_lo.append(lo)
            win_hi.append(hi)
            base.append(row)
        row += hi - lo
    if not planned_items:
        return Plan([], np.zeros((0, 4), np.int64), row, starts)
    if sum(len(p.layout.runs_list) for p in planned_items) <= small_runs:
        segments, planned_items = _clip_small(planned_items, win_lo, win_hi, base)
    else:
        segments, planned_items = _clip_vectorised(planned_items, run_blocks, win_lo, win_hi, base)
    return Plan(planned_items, segments, row, starts)


def _clip_small(planned_items, win_lo, win_hi, base):
    """Clip runs to their windows in plain Python: a few runs cost less than numpy's calls."""
    segs = []
    for idx, (p, lo, hi, b) in enumerate(zip(planned_items, win_lo, win_hi, base)):
        for s, e, r0 in p.layout.runs_list:
            a = s if s > lo else lo
            z = e if e < hi else hi
            if z > a:
                segs.append((idx, r0 + a - s, b + a - lo, z - a))
    used = sorted({seg[0] for seg in segs})
    if len(used) != len(planned_items):
        remap = {old: new for new, old in enumerate(used)}
        segs = [(remap[i], r, o, n) for i, r, o, n in segs]
        planned_items = [planned_items[i] for i in used]
    segs.sort(key=lambda seg: seg[2])
    return np.array(segs, dtype=np.int64).reshape(len(segs), 4), planned_items


def _clip_vectorised(planned_items, run_blocks, win_lo, win_hi, base):
    """Clip runs to their windows with a fixed number of numpy operations."""
    counts = np.fromiter((len(b) for b in run_blocks), np.int64, len(run_blocks))
    owner = np.repeat(np.arange(len(run_blocks)), counts)
    runs = np.concatenate(run_blocks)
    lo_a = np.asarray(win_lo, np.int64)[owner]
    hi_a = np.asarray(win_hi, np.int64)[owner]
    clip_lo = np.maximum(runs[:, 0], lo_a)
    clip_hi = np.minimum(runs[:, 1], hi_a)
    keep = clip_hi > clip_lo
    owner, runs, clip_lo, clip_hi, lo_a = owner[keep], runs[keep], clip_lo[keep], clip_hi[keep], lo_a[keep]
    segments = np.stack((
        owner,
        runs[:, 2] + (clip_lo - runs[:, 0]),
        np.asarray(base, np.int64)[owner] + (clip_lo - lo_a),
        clip_hi - clip_lo,
    ), axis=1)

    # Items whose runs all fell outside the chunk (a gap between spans, or mask-False rows).
    used = None if keep.all() else np.unique(owner)
    if used is not None and len(used) != len(planned_items):
        remap = np.full(len(planned_items), -1, np.int64)
        remap[used] = np.arange(len(used))
        segments[:, 0] = remap[segments[:, 0]]
        planned_items = [planned_items[i] for i in used.tolist()]
    return segments[np.argsort(segments[:, 2], kind="stable")], planned_items
