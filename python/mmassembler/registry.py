"""Registered requests on the host: handles, run and item slots, and which windows need work.

Each live request owns a contiguous range of run slots and of item slots (first fit).
Host run rows name the item slot and its first row; the device's rows are built from them
and the items' sources (``mmkernels.layout.device_runs``). A request's
row of ``req`` is laid out as a step-table row (``mmkernels/layout.py``): its run range,
and the bounds a window ``[p, q)`` must keep to need no work: ``READY_LO <= p`` and
``q <= READY_HI`` (every item the window reaches holds a source, and the window is inside
the prompt) and ``p <= START_MAX`` (no held source has been passed). A step gathers its
requests' rows into the step table and checks all windows with two comparisons; only
requests that fail cost Python work. Handles run from 1 to ``max_requests``; rows 0 and
``max_requests + 1`` are sentinels whose bounds fail every window, so a gather clipped to
the table turns any bad handle into a failed check. A removed handle's row fails too.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from mmassembler.errors import CapacityError, SpanError, UnknownHandleError
from mmassembler.runs import NO_LIMIT, run_lists
from mmkernels import layout as L


class RangeAllocator:
    """First-fit allocation of contiguous ranges in ``[0, capacity)``."""

    def __init__(self, capacity: int):
        self.free = [(0, capacity)] if capacity else []  # sorted, disjoint, coalesced

    def alloc(self, n: int) -> int | None:
        if n == 0:
            return 0
        for k, (start, size) in enumerate(self.free):
            if size >= n:
                self.free[k:k + 1] = [(start + n, size - n)] if size > n else []
                return start
        return None

    def release(self, start: int, n: int) -> None:
        if n == 0:
            return
        free = self.free
        k = bisect.bisect_left(free, (start, 0))
        free.insert(k, (start, n))
        if k + 1 < len(free) and start + n == free[k + 1][0]:  # merge with the next range
            free[k] = (start, n + free.pop(k + 1)[1])
        if k > 0 and free[k - 1][0] + free[k - 1][1] == start:  # and with the previous one
            s, size = free.pop(k - 1)
            free[k - 1] = (s, size + free[k - 1][1])


LO, HI, START_MAX = L.STEP_READY_LO, L.STEP_READY_HI, L.STEP_START_MAX  # bounds columns of req
POS, END, ITEM = L.HOST_RUN_POS, L.HOST_RUN_END, L.HOST_RUN_ITEM  # columns of host run rows


class Registry:
    """Live requests' runs and item slots, mirrored on the host."""

    def __init__(self, *, max_requests: int, max_runs: int, max_items: int):
        self.max_requests = max_requests
        self.runs = np.zeros((max_runs, L.HOST_RUN_FIELDS), np.int64)  # host layout
        self._run_alloc, self._item_alloc = RangeAllocator(max_runs), RangeAllocator(max_items)
        self._free_handles = list(range(max_requests, 0, -1))
        self.req = np.zeros((max_requests + 2, L.STEP_FIELDS), np.int64)
        self.req[:, LO], self.req[:, HI] = NO_LIMIT, -1  # no live request: every window fails
        self.live = np.zeros(max_requests + 2, bool)
        self.run_first, self.run_end = self.req[:, L.STEP_RUN_FIRST], self.req[:, L.STEP_RUN_END]
        self.slots = np.zeros((max_requests + 2, 3), np.int64)  # first item, items, prompt length
        self.item_first, self.item_count, self.prompt_len = (self.slots[:, c] for c in range(3))
        self.item_obj = np.empty(max_items, object)  # the Item of each slot
        self.item_src = np.empty(max_items, object)  # its source while held, else None
        self.item_meta = np.zeros((max_items, 3), np.int64)  # rows, end of last position, owner
        self.item_rows, self.item_end, self.item_owner = (self.item_meta[:, c] for c in range(3))
        self.held = np.zeros(max_items, bool)
        # each slot's source entry (``SOURCE_*`` fields; NO_SOURCE while it holds none): the
        # device's run rows are built from the host runs and these when they are sent
        self.item_entry = np.zeros((max_items, L.SOURCE_FIELDS), np.int64)
        self.item_entry[:] = L.NO_SOURCE
        self._flag = np.zeros(max_items, bool)  # scratch flags over slots, all False between calls
        self.dirty_runs: list[np.ndarray] = []  # run indices whose device rows are stale

    def add(self, items: Sequence, prompt_len: int | None) -> int:
        """Register a request; its handle. Raises ``SpanError``/``CapacityError`` first."""
        return self.add_many([(items, prompt_len)])[0]

    def add_many(self, requests: Sequence[tuple[Sequence, int | None]]) -> list[int]:
        """Register requests ``(items, prompt_len)`` together: one slot range each for all
        their runs and items, one write per table. Raises ``SpanError`` (naming the
        request's index in ``requests`` when there are several) or ``CapacityError`` before
        any change."""
        built = []
        for i, (items, prompt_len) in enumerate(requests):
            try:
                built.append(run_lists(items, prompt_len))
            except SpanError as exc:
                if len(requests) == 1:
                    raise
                raise type(exc)(f"requests[{i}]: {exc}", request=i, item_key=exc.item_key) from None
        m = len(requests)
        if m > len(self._free_handles):
            raise CapacityError(f"{m} more requests do not fit max_requests {self.max_requests}")
        k_all = sum(len(runs) for runs, _ in built)
        n_all = sum(len(meta) for _, meta in built)
        r0 = self._run_alloc.alloc(k_all)
        if r0 is None:
            raise CapacityError(f"{k_all} runs do not fit the run table (max_runs); remove requests")
        i0 = self._item_alloc.alloc(n_all)
        if i0 is None:
            self._run_alloc.release(r0, k_all)
            raise CapacityError(f"{n_all} items do not fit the item table (max_items); remove requests")
        handles = [self._free_handles.pop() for _ in range(m)]
        run_rows, req_rows, slot_rows, meta_rows, objs, owners = [], [], [], [], [], []
        r, i = r0, i0
        for h, (items, prompt_len), (runs, meta) in zip(handles, requests, built):
            k, n = len(runs), len(meta)
            run_rows.extend((s, e, row, j + i) for s, e, row, j in runs)
            prompt = NO_LIMIT if prompt_len is None else prompt_len
            # no runs: a window needs no sources; else the first window with tokens resolves
            row = [0] * L.STEP_FIELDS
            row[HI], row[START_MAX] = prompt if k == 0 else 0, NO_LIMIT
            row[L.STEP_RUN_FIRST], row[L.STEP_RUN_END] = r, r + k
            req_rows.append(row)
            slot_rows.append((i, n, prompt))
            meta_rows.extend(meta)
            objs.extend(items)
            owners.extend([h] * n)
            r, i = r + k, i + n
        if k_all:
            self.runs[r0:r0 + k_all] = run_rows
            self.dirty_runs.append(np.arange(r0, r0 + k_all))
        self.req[handles] = req_rows
        self.slots[handles] = slot_rows
        if n_all:
            items_slice = slice(i0, i0 + n_all)
            self.item_obj[items_slice] = objs
            self.item_src[items_slice] = None
            self.item_entry[items_slice] = L.NO_SOURCE
            self.item_meta[items_slice] = meta_rows
            self.item_owner[items_slice] = owners
            self.held[items_slice] = False
        self.live[handles] = True
        return handles

    def remove(self, h: int) -> list:
        """Free a request's slots; returns the sources it held (to release after use)."""
        self.check_live(h)
        i0, n = int(self.item_first[h]), int(self.item_count[h])
        r0, r1 = int(self.run_first[h]), int(self.run_end[h])
        held = [t for t in self.item_src[i0:i0 + n] if t is not None]
        self.item_src[i0:i0 + n] = None
        self.item_entry[i0:i0 + n] = L.NO_SOURCE
        self.item_obj[i0:i0 + n] = None
        self.held[i0:i0 + n] = False
        self._run_alloc.release(r0, r1 - r0)
        self._item_alloc.release(i0, n)
        self.live[h] = False
        self.req[h, LO], self.req[h, HI] = NO_LIMIT, -1
        self.prompt_len[h] = 0
        self._free_handles.append(h)
        return held

    def check_live(self, h) -> None:
        if isinstance(h, (bool, np.bool_)) or not isinstance(h, (int, np.integer)) or not (
                0 < h <= self.max_requests and self.live[h]):
            raise UnknownHandleError(f"{h!r} is not the handle of a registered request")

    def needs_work(self, h: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Indices of (valid) windows that reach an item without a source or pass a held one."""
        g = self.req[h]
        return np.flatnonzero((q > p) & ((p < g[:, LO]) | (q > g[:, HI]) | (p > g[:, START_MAX])))

    def reached(self, h: np.ndarray):
        """For requests ``h``: their run indices and, for each, its index in ``h``; their
        item slots and, for each, its index in ``h``."""
        ridx, rwin = _ranges(self.run_first[h], self.run_end[h])
        iidx, iwin = _ranges(self.item_first[h], self.item_first[h] + self.item_count[h])
        return ridx, rwin, iidx, iwin

    def update_ready(self, h, p, q, ridx, rwin, iidx, iwin) -> None:
        """Recompute the ready interval and release point of windows' requests from ``held``."""
        runs = self.runs[ridx]
        unheld = ~self.held[runs[:, ITEM]]
        lo = np.full(len(h), -NO_LIMIT)
        hi = np.full(len(h), NO_LIMIT)
        before = unheld & (runs[:, POS] < p[rwin])
        np.maximum.at(lo, rwin[before], np.minimum(runs[before, END], p[rwin[before]]))
        after = unheld & (runs[:, END] > q[rwin])
        np.minimum.at(hi, rwin[after], np.maximum(runs[after, POS], q[rwin[after]]))
        release = np.full(len(h), NO_LIMIT)
        held = self.held[iidx]
        np.minimum.at(release, iwin[held], self.item_end[iidx[held]])
        self.req[h, LO] = np.maximum(lo, 0)
        self.req[h, HI] = np.minimum(hi, self.prompt_len[h])
        self.req[h, START_MAX] = release - 1

    def unheld_among(self, hit: np.ndarray, iidx: np.ndarray) -> np.ndarray:
        """The slots of ``iidx`` (distinct) that appear in ``hit`` and hold no source, in
        ``iidx`` order (a flag array, not a sort: this runs on every step that resolves)."""
        flag = self._flag
        flag[hit] = True
        found = iidx[flag[iidx]]
        flag[hit] = False
        return found[~self.held[found]]

    def set_sources(self, slots: np.ndarray, sources: list, entries: list, passed: np.ndarray,
                    ridx: np.ndarray) -> None:
        """Hold ``sources`` (with their source entries) for ``slots`` and let go of those of
        ``passed``; mark the runs among ``ridx`` that read any of them stale."""
        self.item_src[passed] = None
        self.held[passed] = False
        self.item_entry[passed] = L.NO_SOURCE
        for s, t in zip(slots.tolist(), sources):
            self.item_src[s] = t
        self.held[slots] = True
        if len(slots):
            self.item_entry[slots] = entries
        changed = self._flag
        changed[slots], changed[passed] = True, True
        stale = ridx[changed[self.runs[ridx, ITEM]]]
        changed[slots], changed[passed] = False, False
        if len(stale):
            self.dirty_runs.append(stale)

    def take_dirty_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Stale run indices (each once) and their device rows, built from the current
        host runs and source entries; none are stale afterwards."""
        if not self.dirty_runs:
            return np.zeros(0, np.int64), np.zeros((0, L.RUN_FIELDS), np.int64)
        parts, self.dirty_runs = self.dirty_runs, []
        idx = parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))
        host = self.runs[idx]
        return idx, L.device_runs(host, self.item_entry[host[:, ITEM]])


def _ranges(first: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(first[i], end[i])`` and, for each element, its ``i``."""
    counts = end - first
    which = np.repeat(np.arange(len(first)), counts)
    idx = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return idx + first[which], which
