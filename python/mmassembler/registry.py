"""Registered requests on the host: handles, run and item slots, and which windows need work.

Each live request owns a contiguous range of run slots and of item slots. Registration
appends at the top of each table (one range for a whole batch of new requests, written
in one assignment per column); removal only marks slots free; when the top reaches the
end, the live ranges are compacted to the bottom in array operations (their device
rows rewritten with the next upload). So registering and removing cost array
operations per batch, never a call per item, and capacity is the tables' total, never
split by fragments.

Host run rows name the item slot and its first row; the device's rows are built from
them and the items' sources (``mmkernels.layout.device_runs``). A request's row of
``req`` is laid out as a step-table row (``mmkernels/layout.py``): its run range, and the
bounds a window ``[p, q)`` must keep to need no work: ``READY_LO <= p`` and
``q <= READY_HI`` (every item the window reaches holds a source, and the window is inside
the prompt) and ``p <= START_MAX`` (no held source has been passed). A step gathers its
requests' rows into the step table and checks all windows with two comparisons; only
requests that fail cost Python work. Handles run from 1 to ``max_requests``; rows 0 and
``max_requests + 1`` are sentinels whose bounds fail every window, so a gather clipped to
the table turns any bad handle into a failed check. A removed handle's row fails too.
"""

from __future__ import annotations

from itertools import repeat
from operator import is_not

import numpy as np

from mmassembler.errors import BatchShapeError, CapacityError, UnknownHandleError
from mmassembler.runs import NO_LIMIT, NewRequests, build_runs
from mmkernels import layout as L

LO, HI, START_MAX = L.STEP_READY_LO, L.STEP_READY_HI, L.STEP_START_MAX  # bounds columns of req
POS, END, ITEM = L.HOST_RUN_POS, L.HOST_RUN_END, L.HOST_RUN_ITEM  # columns of host run rows


def _objects(values: list, n: int) -> np.ndarray:
    """A 1-D object array of the ``n`` ``values`` (numpy never looks inside them: tensors stay whole)."""
    return np.fromiter(values, object, n)


class Registry:
    """Live requests' runs and item slots, mirrored on the host."""

    def __init__(self, *, max_requests: int, max_runs: int, max_items: int):
        self.max_requests, self.max_runs, self.max_items = max_requests, max_runs, max_items
        self.runs = np.zeros((max_runs, L.HOST_RUN_FIELDS), np.int64)  # host layout
        self.run_top = self.item_top = 0  # registration appends here
        self.fresh = 0  # batches registered since the last step that resolved
        self.live_runs = self.live_items = 0
        self._free_handles = list(range(max_requests, 0, -1))
        self.req = np.zeros((max_requests + 2, L.STEP_FIELDS), np.int64)
        self.req[:, LO], self.req[:, HI] = NO_LIMIT, -1  # no live request: every window fails
        self.live = np.zeros(max_requests + 2, bool)
        self.run_first, self.run_end = self.req[:, L.STEP_RUN_FIRST], self.req[:, L.STEP_RUN_END]
        self.slots = np.zeros((max_requests + 2, 3), np.int64)  # first item, items, prompt length
        self.item_first, self.item_count, self.prompt_len = (self.slots[:, c] for c in range(3))
        self.item_obj = np.empty(max_items, object)  # what the item's encoder is handed
        self.item_key = np.empty(max_items, object)
        self.item_modality = np.empty(max_items, object)
        self.item_emb = np.empty(max_items, object)  # its precomputed embedding, or None
        self.item_src = np.empty(max_items, object)  # its source while held, else None
        self.item_row0 = np.zeros(max_items, np.int64)  # where its rows start in its source
        self.item_version = np.full(max_items, -1, np.int64)  # a stable source's version when read
        self.item_meta = np.zeros((max_items, 3), np.int64)  # rows, end of last position, owner
        self.item_rows, self.item_end, self.item_owner = (self.item_meta[:, c] for c in range(3))
        self.has_emb = np.zeros(max_items, bool)
        self.held = np.zeros(max_items, bool)
        # each slot's source entry (``SOURCE_*`` fields; NO_SOURCE while it holds none): the
        # device's run rows are built from the host runs and these when they are sent
        self.item_entry = np.zeros((max_items, L.SOURCE_FIELDS), np.int64)
        self.item_entry[:] = L.NO_SOURCE
        self._flag = np.zeros(max_items, bool)  # scratch flags over slots, all False between calls
        # runs whose device rows are stale: a flag per run, and the range holding every flag
        self._dirty = np.zeros(max_runs, bool)
        self._dirty_lo, self._dirty_hi = max_runs, 0

    @property
    def num_live(self) -> int:
        return self.max_requests - len(self._free_handles)

    # -- registration -----------------------------------------------------------------------
    def add_many(self, new: NewRequests) -> list[int]:
        """Register a batch of new requests: every span checked and every run built in array
        operations, one slot range for all their runs and one for all their items. Raises
        ``SpanError`` (naming the request's index when there are several) or
        ``CapacityError`` before any change. Their handles, in order."""
        built = build_runs(new)
        m, n, k = len(new.counts), len(new.keys), len(built.runs)
        if m > len(self._free_handles):
            raise CapacityError(f"{m} more requests do not fit max_requests {self.max_requests} "
                                f"({self.num_live} live): remove finished requests")
        if self.live_runs + k > self.max_runs:
            raise CapacityError(f"{k} runs do not fit the run table (max_runs {self.max_runs}, "
                                f"{self.live_runs} in use): remove finished requests")
        if self.live_items + n > self.max_items:
            raise CapacityError(f"{n} items do not fit the item table (max_items {self.max_items}, "
                                f"{self.live_items} in use): remove finished requests")
        if self.run_top + k > self.max_runs or self.item_top + n > self.max_items:
            self.compact()
        handles = self._free_handles[-m:] if m else []
        del self._free_handles[len(self._free_handles) - m:]
        handles.reverse()
        h = np.array(handles, np.int64)
        r0, i0 = self.run_top, self.item_top
        counts, prompt, run_counts = built.counts, built.prompts, built.run_counts
        if k:
            runs = built.runs
            runs[:, ITEM] += i0
            self.runs[r0:r0 + k] = runs
            self._dirty[r0:r0 + k] = True
            self._dirty_lo, self._dirty_hi = min(self._dirty_lo, r0), max(self._dirty_hi, r0 + k)
        rows = np.zeros((m, L.STEP_FIELDS), np.int64)
        end = run_counts.cumsum() + r0
        rows[:, L.STEP_RUN_FIRST], rows[:, L.STEP_RUN_END] = end - run_counts, end
        # no runs: a window needs no sources; else the first window with tokens resolves
        rows[:, HI] = prompt * (run_counts == 0)
        rows[:, START_MAX] = NO_LIMIT
        self.req[h] = rows
        slots = np.empty((m, 3), np.int64)
        slots[:, 0], slots[:, 1], slots[:, 2] = counts.cumsum() - counts + i0, counts, prompt
        self.slots[h] = slots
        if n:
            s = slice(i0, i0 + n)
            self.item_obj[s] = _objects(new.objs, n)
            self.item_key[s] = _objects(new.keys, n)
            self.item_modality[s] = _objects(new.modality, n)
            self.item_emb[s] = _objects(new.embedding, n)
            self.has_emb[s] = np.fromiter(map(is_not, new.embedding, repeat(None)), bool, n)
            self.item_rows[s], self.item_end[s] = built.rows, built.ends
            self.item_owner[s] = h.repeat(counts)
        self.live[h] = True
        self.fresh += int(k > 0)  # requests whose first window will need sources
        self.run_top, self.item_top = r0 + k, i0 + n
        self.live_runs += k
        self.live_items += n
        return handles

    def check_handles(self, handles) -> np.ndarray:
        """``handles`` as distinct live handles (int64); ``UnknownHandleError`` /
        ``BatchShapeError`` naming the first bad one otherwise."""
        from mmassembler.step_inputs import int_array

        h = int_array(handles, "handles")
        if not len(h):
            return h
        live = self.live
        if not 0 < np.minimum.reduce(h) <= np.maximum.reduce(h) <= self.max_requests or False in live[h]:
            bad = (h < 1) | (h > self.max_requests)
            if True not in bad:
                bad = ~live[h]
            i = int(bad.nonzero()[0][0])
            raise UnknownHandleError(f"{h[i]!r} is not the handle of a registered request", request=i)
        if len(h) > 1:  # distinct (handles are in range here: bincount is small)
            counts = np.bincount(h)
            if np.maximum.reduce(counts) > 1:
                i = int((counts[h] > 1).nonzero()[0][1])
                raise BatchShapeError(f"handle {h[i]} appears twice", request=i)
        return h

    def remove_many(self, handles) -> list:
        """Free requests' slots (checked first: nothing changes on a bad handle); returns the
        sources they held (to let go of once the queued steps have run)."""
        h = self.check_handles(handles)
        if not len(h):
            return []
        idx, _ = _ranges(self.item_first[h], self.item_first[h] + self.item_count[h])
        held = self.item_src[idx[self.held[idx]]].tolist()
        for col in (self.item_src, self.item_obj, self.item_key, self.item_modality, self.item_emb):
            col[idx] = None
        self.item_entry[idx] = L.NO_SOURCE
        self.held[idx] = False
        self.live_runs -= int(np.add.reduce(self.run_end[h] - self.run_first[h]))
        self.live_items -= len(idx)
        self.live[h] = False
        self.req[h, LO], self.req[h, HI] = NO_LIMIT, -1
        self.prompt_len[h] = 0
        self._free_handles.extend(h.tolist())
        if not self.live_items and not self.live_runs:
            self.run_top = self.item_top = 0  # empty: start again at the bottom
        return held

    def compact(self) -> None:
        """Move every live request's runs and items to the bottom of their tables, in order
        (array operations); every live run's device row is rewritten with the next upload."""
        h = np.flatnonzero(self.live)
        h = h[np.argsort(self.run_first[h], kind="stable")]
        ridx, rwin = _ranges(self.run_first[h], self.run_end[h])
        iidx, iwin = _ranges(self.item_first[h], self.item_first[h] + self.item_count[h])
        k, n = len(ridx), len(iidx)
        remap = np.zeros(self.max_items, np.int64)
        remap[iidx] = np.arange(n)
        runs = self.runs[ridx]
        runs[:, ITEM] = remap[runs[:, ITEM]]
        self.runs[:k] = runs
        for col in (self.item_obj, self.item_key, self.item_modality, self.item_emb, self.item_src,
                    self.item_row0, self.item_version, self.item_meta, self.has_emb, self.held, self.item_entry):
            col[:n] = col[iidx]
            col[n:] = (L.NO_SOURCE if col is self.item_entry else -1 if col is self.item_version
                       else None if col.dtype == object else 0)
        rc = self.run_end[h] - self.run_first[h]
        ic = self.item_count[h]
        self.run_end[h] = np.cumsum(rc)
        self.run_first[h] = self.run_end[h] - rc
        self.item_first[h] = np.cumsum(ic) - ic
        self.run_top, self.item_top = k, n
        self._dirty[:] = False
        self._dirty_lo, self._dirty_hi = self.max_runs, 0
        if k:
            self._mark_dirty(slice(0, k), 0, k)

    def check_live(self, h) -> None:
        if isinstance(h, (bool, np.bool_)) or not isinstance(h, (int, np.integer)) or not (
                0 < h <= self.max_requests and self.live[h]):
            raise UnknownHandleError(f"{h!r} is not the handle of a registered request")

    # -- steps ------------------------------------------------------------------------------
    def needs_work(self, h: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Indices of (valid) windows that reach an item without a source or pass a held one."""
        g = self.req[h]
        return ((q > p) & ((p < g[:, LO]) | (q > g[:, HI]) | (p > g[:, START_MAX]))).nonzero()[0]

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
        bounds = np.empty((3, len(h)), np.int64)  # ready from, ready to, release
        lo, hi, release = bounds
        lo.fill(0)
        hi.fill(NO_LIMIT)
        release.fill(NO_LIMIT)
        if True in unheld:
            before = unheld & (runs[:, POS] < p[rwin])
            np.maximum.at(lo, rwin[before], np.minimum(runs[before, END], p[rwin[before]]))
            after = unheld & (runs[:, END] > q[rwin])
            np.minimum.at(hi, rwin[after], np.maximum(runs[after, POS], q[rwin[after]]))
        held = self.held[iidx]
        np.minimum.at(release, iwin[held], self.item_end[iidx[held]])
        req = self.req
        req[h, LO] = lo
        req[h, HI] = np.minimum(hi, self.prompt_len[h])
        req[h, START_MAX] = release - 1

    def unheld_among(self, hit: np.ndarray, iidx: np.ndarray) -> np.ndarray:
        """The slots of ``iidx`` (distinct) that appear in ``hit`` and hold no source, in
        ``iidx`` order (a flag array, not a sort: this runs on every step that resolves)."""
        flag = self._flag
        flag[hit] = True
        found = iidx[flag[iidx]]
        flag[hit] = False
        return found[~self.held[found]]

    def set_sources(self, slots: np.ndarray, sources: list, first_rows: np.ndarray, entries: np.ndarray,
                    passed: np.ndarray, ridx: np.ndarray, versions: np.ndarray | None = None) -> list:
        """Hold ``sources`` (whose rows start at ``first_rows``; with their source entries)
        for ``slots`` and let go of those of ``passed`` (returned, to release once queued
        steps have run); mark the runs among ``ridx`` that read any of them stale."""
        released = self.item_src[passed].tolist()
        self.item_src[passed] = None
        self.held[passed] = False
        self.item_entry[passed] = L.NO_SOURCE
        if len(slots):
            self.item_src[slots] = _objects(sources, len(slots))
            self.item_row0[slots] = first_rows
            self.item_version[slots] = -1 if versions is None else versions
            self.held[slots] = True
            self.item_entry[slots] = entries
        changed = self._flag
        changed[slots], changed[passed] = True, True
        stale = ridx[changed[self.runs[ridx, ITEM]]]
        changed[slots], changed[passed] = False, False
        if len(stale):
            self._mark_dirty(stale, int(stale.min()), int(stale.max()) + 1)
        return released

    def _mark_dirty(self, runs, lo: int, hi: int) -> None:
        self._dirty[runs] = True
        self._dirty_lo, self._dirty_hi = min(self._dirty_lo, lo), max(self._dirty_hi, hi)

    @property
    def has_dirty_runs(self) -> bool:
        return self._dirty_hi > self._dirty_lo

    def take_dirty_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Stale run indices (each once, ascending) and their device rows, built from the
        current host runs and source entries; none are stale afterwards."""
        lo, hi = self._dirty_lo, self._dirty_hi
        if hi <= lo:
            return np.zeros(0, np.int64), np.zeros((0, L.RUN_FIELDS), np.int64)
        flags = self._dirty[lo:hi]
        idx = np.arange(lo, hi) if False not in flags else flags.nonzero()[0] + lo
        flags[:] = False
        self._dirty_lo, self._dirty_hi = self.max_runs, 0
        host = self.runs[idx]
        return idx, L.device_runs(host, self.item_entry[host[:, ITEM]])


def _ranges(first: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(first[i], end[i])`` and, for each element, its ``i``."""
    if len(first) == 1:
        a, b = int(first[0]), int(end[0])
        return np.arange(a, b), np.zeros(b - a, np.int64)
    counts = end - first
    which = np.arange(len(first)).repeat(counts)
    idx = np.arange(int(np.add.reduce(counts)), dtype=np.int64)
    idx += (first - counts.cumsum() + counts).repeat(counts)
    return idx, which
