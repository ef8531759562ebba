"""The planner: items ∩ chunk windows -> segments, position-driven, O(items) host work.

A segment ``(planned item, item first row, output first row, rows)`` copies consecutive
embedding rows to consecutive output rows. Each item's runs (``ItemLayout``) are cut to
its request's window; no per-token Python loop.

Two paths give the same plan (property tests hold them to it): requests with few items
are walked item by item; requests with many items use a ``RequestIndex`` (every run of
the request in position order, built once per request), where a chunk is two bisections
and a handful of numpy operations whatever the number of items.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from mmassembler.batch import Item, ItemLayout, Request
from mmassembler.errors import ChunkWindowError, SpanError

SMALL_RUNS = 32  # up to this many runs, plain Python clips faster than numpy's fixed costs
INDEX_MIN_ITEMS = 16  # requests with at least this many items are planned through an index


class PlannedItem(NamedTuple):
    """An item that has at least one embedding row inside its request's chunk."""

    request: int
    item: Item
    layout: ItemLayout


class IndexedGroup(NamedTuple):
    """Planned items ``[first, first + count)`` are ``index.items[j0:j0 + count]``."""

    first: int
    index: "RequestIndex"
    j0: int
    count: int


@dataclass(frozen=True)
class Plan:
    """What a batch reads: the planned items and the segments that place their rows.

    ``segments[:, 0]`` indexes ``items``; rows are sorted by output row. ``groups`` name
    the runs of planned items that came from a request index, for bulk source lookup.
    """

    items: list[PlannedItem]
    segments: np.ndarray  # int64 [S, 4]
    num_tokens: int
    request_starts: np.ndarray  # output row where each request's chunk begins
    groups: list[IndexedGroup] = field(default_factory=list)

    @property
    def num_mm_rows(self) -> int:
        return int(self.segments[:, 3].sum()) if len(self.segments) else 0


def _check_window(r: int, req: Request) -> tuple[int, int]:
    lo, n = req.prefix_len, req.extend_len
    if type(lo) is not int or type(n) is not int or lo < 0 or n < 0:  # fast path: plain ints
        for name in ("prefix_len", "extend_len"):
            v = getattr(req, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ChunkWindowError(f"{name} must be a non-negative int, got {v!r}", request=r)
    lo, hi = int(lo), int(lo) + int(n)
    pl = req.prompt_len
    if pl is not None and (isinstance(pl, bool) or not isinstance(pl, (int, np.integer)) or pl < 0):
        raise ChunkWindowError(f"prompt_len must be a non-negative int or None, got {pl!r}", request=r)
    if req.prompt_len is not None and hi > req.prompt_len:
        raise ChunkWindowError(f"chunk [{lo}, {hi}) runs past the prompt of {req.prompt_len} "
                               "positions", request=r)
    return lo, hi


def _check_prompt(r: int, req: Request, layouts: Sequence[ItemLayout]) -> None:
    if req.prompt_len is not None:
        for item, lay in zip(req.items, layouts):
            if lay.last >= req.prompt_len:
                raise SpanError(f"span ends at {lay.last}, past the prompt of {req.prompt_len} "
                                "positions", request=r, item_key=item.key)


def check_request_items(r: int, req: Request) -> list[ItemLayout]:
    """Check every item's spans and that items of the request never share a position."""
    for j, item in enumerate(req.items):
        if not isinstance(item, Item):
            raise SpanError(f"items[{j}] is a {type(item).__name__}, not an mmassembler.Item", request=r)
        try:
            hash(item.key)
        except TypeError:
            raise SpanError(f"items[{j}] has an unhashable key {item.key!r}", request=r) from None
    layouts = [item._layout or item.layout(r) for item in req.items]
    _check_prompt(r, req, layouts)
    if len(layouts) > 1 and not all(a.last < b.first for a, b in zip(layouts, layouts[1:])):
        order = sorted(range(len(layouts)), key=lambda i: layouts[i].first)
        disjoint = all(layouts[order[i]].last < layouts[order[i + 1]].first
                       for i in range(len(order) - 1))
        if not disjoint:  # interleaved items: compare their spans one by one
            _check_interleaved(r, req)
    return layouts


def _check_interleaved(r: int, req: Request) -> None:
    """Spans of different items never share a position -- except that a masked item's
    spans may overlap others where its mask leaves the positions to them (Qwen-Omni's audio
    in video): then the positions that take rows must not overlap."""
    spans = []
    for item in req.items:
        if item.embed_mask is None:
            spans.extend((int(s), int(e), item.key) for s, e in item.spans)
        else:
            spans.extend((s, e - 1, item.key) for s, e, _ in item.layout(r).runs_list)
    spans.sort()
    for (s0, e0, k0), (s1, e1, k1) in zip(spans, spans[1:]):
        if s1 <= e0:
            raise SpanError(f"span ({s1}, {e1}) overlaps span ({s0}, {e0}) of item {k0}",
                            request=r, item_key=k1)


class RequestIndex:
    """Every embedding run of a request, in position order, built (and checked) once.

    ``runs[k] = (first position, end position, first row, item)`` with ``item`` indexing
    ``items`` (the request's items in position order). Runs of different items never
    overlap, so a window's runs are one contiguous slice, found by bisection.
    """

    def __init__(self, r: int, req: Request):
        layouts = check_request_items(r, req)
        order = sorted(range(len(layouts)), key=lambda i: layouts[i].first)
        self.items = [req.items[i] for i in order]
        self.layouts = [layouts[i] for i in order]
        self.prompt_len = req.prompt_len
        flat = [(s, e, r0, j) for j, lay in enumerate(self.layouts) for s, e, r0 in lay.runs_list]
        flat.sort()  # by position; runs of different items never overlap
        self.runs = np.array(flat, dtype=np.int64).reshape(len(flat), 4)
        self.run_starts = [run[0] for run in flat]
        self.run_ends = [run[1] for run in flat]
        self.owners = owners = [run[3] for run in flat]
        # every item has rows and items do not interleave: a slice of runs is a range of items
        self.contiguous = (all(lay.num_rows for lay in self.layouts)
                           and all(a <= b for a, b in zip(owners, owners[1:])))
        self.bulk = None  # (widths, device, sources, info), set by the source resolver
        self._planned: dict[int, list[PlannedItem]] = {}

    def planned(self, r: int) -> list[PlannedItem]:
        """``PlannedItem`` of every item for request index ``r``, made once per ``r``."""
        items = self._planned.get(r)
        if items is None:
            items = self._planned[r] = [PlannedItem(r, it, lay)
                                        for it, lay in zip(self.items, self.layouts)]
        return items

    @classmethod
    def of(cls, r: int, req: Request) -> "RequestIndex":
        """The request's index, built on first use and kept on the request."""
        idx = req._index
        if idx is None:
            idx = cls(r, req)
            object.__setattr__(req, "_index", idx)
        elif idx.prompt_len != req.prompt_len:
            _check_prompt(r, req, [it.layout(r) for it in req.items])
        return idx


def plan_batch(requests: Sequence[Request], *, small_runs: int = SMALL_RUNS,
               index_min_items: int = INDEX_MIN_ITEMS, path: str = "auto") -> Plan:
    """Check the requests and cut every item's rows to its request's chunk.

    Items wholly in the prefix or the future, and items whose positions in the chunk
    all keep their text embedding, are not planned (so never read nor encoded).

    A request goes through its ``RequestIndex`` when it has one, has been planned
    before (engines advance requests with ``Request.with_window``), or has at least
    ``index_min_items`` items; other requests are walked item by item. ``path``
    (``"walk"``/``"index"``) and ``small_runs`` force a path, for tests.
    """
    planned: list[PlannedItem] = []
    groups: list[IndexedGroup] = []
    blocks: list[np.ndarray] = []
    walked = []  # (global item index, layout, lo, hi, base) of walked requests' items
    windows = []  # (index, request, lo, hi, base, first run, end run) of indexed requests
    starts = np.zeros(len(requests), dtype=np.int64)
    row = 0
    for r, req in enumerate(requests):
        lo, hi = _check_window(r, req)
        starts[r] = row
        if path == "index" or (path == "auto" and (
                req._index is not None or req._layouts is not None
                or len(req.items) >= index_min_items)):
            idx = RequestIndex.of(r, req)
            if hi > lo:
                i0 = bisect_right(idx.run_ends, lo)  # first run ending after lo
                i1 = bisect_left(idx.run_starts, hi)  # runs starting before hi
                if i1 > i0:
                    if idx.contiguous:
                        windows.append((idx, r, lo, hi, row, i0, i1))
                    else:
                        _plan_indexed_slow(idx, r, lo, hi, row, i0, i1, planned, blocks)
        else:
            layouts = req._layouts
            if layouts is None:
                layouts = check_request_items(r, req)
                object.__setattr__(req, "_layouts", layouts)
            for item, lay in zip(req.items, layouts):
                if lay.last < lo or lay.first >= hi or lay.num_rows == 0:
                    continue
                walked.append((len(planned), lay, lo, hi, row))
                planned.append(PlannedItem(r, item, lay))
        row += hi - lo
    if windows:
        blocks.append(_plan_windows(windows, planned, groups))
    if not planned:
        return Plan([], np.zeros((0, 4), np.int64), row, starts)

    dropped = False
    if walked:
        if sum(len(w[1].runs_list) for w in walked) <= small_runs:
            block = _clip_small(walked)
        else:
            block = _clip_vectorised(walked)
        # a walked item whose runs all fell outside the chunk has no segment
        dropped = len(np.unique(block[:, 0])) != len(walked)
        blocks.append(block)
    segments = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    segments = segments[np.argsort(segments[:, 2], kind="stable")]
    if dropped:
        used = np.unique(segments[:, 0])
        # Walked items whose runs all fell outside the chunk (a gap between spans, or
        # mask-False rows): drop them and renumber.
        remap = np.full(len(planned), -1, np.int64)
        remap[used] = np.arange(len(used))
        segments[:, 0] = remap[segments[:, 0]]
        groups = [IndexedGroup(int(remap[g.first]), g.index, g.j0, g.count) for g in groups]
        planned = [planned[i] for i in used.tolist()]
    return Plan(planned, segments, row, starts, groups)


def _plan_windows(windows, planned, groups) -> np.ndarray:
    """Segments of every indexed request at once: one slice of runs per request, clipped
    to its window in a fixed number of numpy operations for the whole batch."""
    counts, shift, lo_hi_base = [], [], []
    for idx, r, lo, hi, base, i0, i1 in windows:
        j0, j1 = idx.owners[i0], idx.owners[i1 - 1] + 1  # contiguous: runs i0..i1 are items j0..j1
        first = len(planned)
        planned.extend(idx.planned(r)[j0:j1])
        groups.append(IndexedGroup(first, idx, j0, j1 - j0))
        counts.append(i1 - i0)
        shift.append(first - j0)
        lo_hi_base.append((lo, hi, base))
    if len(windows) == 1:
        idx, _, _, _, _, i0, i1 = windows[0]
        runs = idx.runs[i0:i1]
    else:
        runs = np.concatenate([w[0].runs[w[5]:w[6]] for w in windows])
    each = np.repeat(np.arange(len(windows)), counts)
    lo, hi, base = np.array(lo_hi_base, dtype=np.int64)[each].T
    start = np.maximum(runs[:, 0], lo)
    return np.stack((runs[:, 3] + np.asarray(shift, np.int64)[each], runs[:, 2] + start - runs[:, 0],
                     base + start - lo, np.minimum(runs[:, 1], hi) - start), axis=1)


def _plan_indexed_slow(idx, r, lo, hi, base, i0, i1, planned, blocks) -> None:
    """An indexed request whose items interleave or include empty ones: renumber by unique."""
    seg = idx.runs[i0:i1].copy()
    if seg[0, 0] < lo:
        seg[0, 2] += lo - seg[0, 0]
        seg[0, 0] = lo
    if seg[-1, 1] > hi:
        seg[-1, 1] = hi
    used, local = np.unique(seg[:, 3], return_inverse=True)
    first = len(planned)
    every = idx.planned(r)
    planned.extend(every[j] for j in used.tolist())
    blocks.append(np.column_stack((first + local, seg[:, 2], base + seg[:, 0] - lo,
                                   seg[:, 1] - seg[:, 0])))


def _clip_small(walked) -> np.ndarray:
    """Clip walked items' runs in plain Python: a few runs cost less than numpy's calls."""
    segs = []
    for idx, lay, lo, hi, b in walked:
        for s, e, r0 in lay.runs_list:
            a = s if s > lo else lo
            z = e if e < hi else hi
            if z > a:
                segs.append((idx, r0 + a - s, b + a - lo, z - a))
    return np.array(segs, dtype=np.int64).reshape(len(segs), 4)


def _clip_vectorised(walked) -> np.ndarray:
    """Clip walked items' runs with a fixed number of numpy operations."""
    counts = np.fromiter((len(w[1].runs) for w in walked), np.int64, len(walked))
    info = np.array([(w[0], w[2], w[3], w[4]) for w in walked], dtype=np.int64)[
        np.repeat(np.arange(len(walked)), counts)]
    runs = np.concatenate([w[1].runs for w in walked])
    clip_lo = np.maximum(runs[:, 0], info[:, 1])
    clip_hi = np.minimum(runs[:, 1], info[:, 2])
    keep = clip_hi > clip_lo
    return np.stack((info[keep, 0], (runs[:, 2] + clip_lo - runs[:, 0])[keep],
                     (info[:, 3] + clip_lo - info[:, 1])[keep], (clip_hi - clip_lo)[keep]), axis=1)
