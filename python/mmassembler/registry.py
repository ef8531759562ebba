"""Registered requests on the host: a Python record per request, and the bounds table the
steady step checks windows against.

A batch of requests registered together shares one ``Batch``: its items' columns, its
runs (``runs.BuiltRuns``) and its items' sources, as Python lists; each request is a
``RequestState`` that points at its ranges of them. A request holds the bounds a window
``[p, q)`` must keep to need no work: ``lo <= p``, ``q <= hi`` (every item the window
reaches holds a source, and the window is inside the prompt) and ``p <= smax`` (no held
source has been passed). Registering and removing requests is plain Python with no array
operation and two objects a request; the bounds are mirrored into ``req``, laid out as
step-table rows (``mmkernels/layout.py``), so a step with many windows checks them all
with a few array operations (``fill.py``). Handles run from 1 to ``max_requests``; rows
0 and ``max_requests + 1`` of ``req``, and the row of a handle not live, are sentinels
whose bounds fail every window. A removed request's items are cleared from its batch, so
nothing it held outlives it.

Each live request owns a contiguous range of run slots and of item slots: registration
takes them from the top of each table; when the top reaches the end, the live ranges
are compacted to the bottom (rare; every live request's run rows are then sent again).
"""

from __future__ import annotations

import operator

import numpy as np

from mmassembler.errors import BatchShapeError, CapacityError, UnknownHandleError
from mmassembler.runs import NO_LIMIT, BuiltRuns, NewRequests, build_runs
from mmkernels import layout as L

NEVER = (0, NO_LIMIT, 0, 0, -1, -1, 0, 0)  # a req row whose bounds fail every window


class Batch:
    """What the requests of one registration share, per item (``keys``, ``mods``, ``embs``:
    precomputed embedding or ``None``, ``objs``: what its encoder is handed, ``rows``,
    ``iend``, ``srcs``: ``(source, first row, source entry, version)`` while it holds a
    source, else ``None``) and per run (``rpos``, ``rend``, ``rrow``, ``ritem``)."""

    __slots__ = ("keys", "mods", "embs", "objs", "rows", "iend", "srcs", "rpos", "rend", "rrow", "ritem")


class RequestState:
    """One registered request (see the module doc): items ``a .. a + nitems - 1`` and runs
    ``ra .. ra + nruns - 1`` of its ``batch``; ``simple``: its run ``ra + k`` is its item
    ``a + k`` from row 0. ``held`` keys its items (batch indices) that hold a source.
    ``run0``: its first run slot on the device. ``fresh``: its run rows have not been sent
    since they were placed."""

    __slots__ = ("handle", "prompt", "batch", "a", "ra", "nitems", "nruns", "simple", "i0", "run0", "held",
                 "lo", "hi", "smax", "fresh", "seen")

    def item_of_run(self, k: int) -> int:
        """The batch index of the item run ``k`` (a batch index) reads."""
        return self.a + (k - self.ra if self.simple else self.batch.ritem[k])

    def items(self) -> range:
        return range(self.a, self.a + self.nitems)


class Registry:
    """Live requests by handle, and the slot ranges and bounds table they use."""

    def __init__(self, *, max_requests: int, max_runs: int, max_items: int):
        self.max_requests, self.max_runs, self.max_items = max_requests, max_runs, max_items
        self.recs: list = [None] * (max_requests + 2)  # handle -> RequestState (None: free)
        self._free = list(range(max_requests, 0, -1))
        self.run_top = self.item_top = 0  # registration takes slots from here
        self.live_runs = self.live_items = 0
        self.req = np.empty((max_requests + 2, L.STEP_FIELDS), np.int64)
        self.req[:] = NEVER
        self.stale: dict = {}  # handles whose row of ``req`` is not written yet (``sync_req``)

    @property
    def num_live(self) -> int:
        return self.max_requests - len(self._free)

    def live_handles(self) -> list[int]:
        return [h for h, rec in enumerate(self.recs) if rec is not None]

    def held_sources(self) -> list:
        """Every source live requests hold now."""
        return [rec.batch.srcs[j][0] for rec in self.recs if rec is not None for j in rec.held]

    def snapshot(self) -> tuple:
        """What the registry holds, comparable with ``==`` (tests check that a failed call
        changed nothing): per live request its bounds, slots and each item's source."""
        return tuple((rec.handle, rec.lo, rec.hi, rec.smax, rec.run0, rec.i0, rec.fresh,
                      tuple(None if s is None else (id(s[0]), s[1], s[2]) for s in
                            rec.batch.srcs[rec.a:rec.a + rec.nitems]))
                     for rec in self.recs if rec is not None) + (self.req.tobytes(),)

    # -- registration -----------------------------------------------------------------------
    def add(self, new: NewRequests, built: BuiltRuns | None = None) -> list[int]:
        """Register a batch of new requests (every span checked, every run built: see
        ``runs.build_runs``; ``built`` when the caller has built them). Raises ``SpanError``
        (naming the request's index when there are several) or ``CapacityError`` before any
        change. Their handles, in order."""
        if built is None:
            built = build_runs(new)
        m, n, k = len(new.counts), len(new.keys), len(built.rpos)
        if m > len(self._free):
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
        free = self._free
        handles = free[len(free) - m:]
        del free[len(free) - m:]
        handles.reverse()
        b = Batch()
        b.keys, b.mods, b.embs, b.objs = new.keys, new.modality, new.embedding, new.objs
        b.rows, b.iend, b.srcs = built.rows, built.iend, [None] * n
        b.rpos, b.rend, b.rrow, b.ritem = built.rpos, built.rend, built.rrow, built.ritem
        recs = self.recs
        r0, i0, a = self.run_top, self.item_top, 0
        for h, c, prompt, ra, nr, simple in zip(handles, new.counts, new.prompts, built.ra, built.nruns,
                                                built.simple):
            rec = RequestState()
            rec.handle, rec.prompt, rec.batch, rec.a, rec.ra = h, prompt, b, a, ra
            rec.nitems, rec.nruns, rec.simple, rec.i0, rec.run0 = c, nr, simple, i0 + a, r0 + ra
            rec.held = {}
            rec.lo, rec.hi, rec.smax = NO_LIMIT, -1, -1  # the first window with tokens resolves
            rec.fresh, rec.seen = True, 0
            recs[h] = rec
            a += c
        self.run_top, self.item_top = r0 + k, i0 + n
        self.live_runs += k
        self.live_items += n
        return handles

    def check_handles(self, handles: list) -> list:
        """Records of ``handles`` (a list of ints; distinct live handles);
        ``UnknownHandleError`` / ``BatchShapeError`` naming the first bad one otherwise."""
        recs, top = self.recs, self.max_requests
        out = [recs[h] if type(h) is int and 0 < h <= top else None for h in handles]
        if None in out:
            i = out.index(None)
            raise UnknownHandleError(f"{handles[i]!r} is not the handle of a registered request", request=i)
        if len(set(handles)) != len(handles):
            seen: dict = {}
            for i, h in enumerate(handles):
                if seen.setdefault(h, i) != i:
                    raise BatchShapeError(f"handle {h} appears twice", request=i)
        return out

    def remove(self, handles) -> list:
        """Free requests' slots (checked first: nothing changes on a bad handle); returns the
        sources they held (to let go of once the queued steps have run). The requests'
        items are cleared from their batches (embeddings, encoder inputs, sources)."""
        hl = _int_list(handles)
        recs = self.check_handles(hl)
        if not recs:
            return []
        released: list = []
        table = self.recs
        runs = items = 0
        for rec in recs:
            b, a, z = rec.batch, rec.a, rec.a + rec.nitems
            if rec.held:
                released += map(_SOURCE, map(b.srcs.__getitem__, rec.held))
            none = [None] * rec.nitems
            b.srcs[a:z] = b.embs[a:z] = b.objs[a:z] = none
            table[rec.handle] = None
            runs += rec.nruns
            items += rec.nitems
        self.live_runs -= runs
        self.live_items -= items
        self.stale.update(dict.fromkeys(hl))
        self._free += hl
        if not self.live_items and not self.live_runs:
            self.run_top = self.item_top = 0  # empty: start again at the bottom
        return released

    def compact(self) -> None:
        """Move every live request's run and item slots to the bottom of their tables, in
        order; every live request's run rows are sent again at its next step (its bounds
        reset, so that step meets it as new)."""
        live = sorted((rec for rec in self.recs if rec is not None), key=_RUN0)
        r0 = i0 = 0
        for rec in live:
            rec.run0, rec.i0 = r0, i0
            r0 += rec.nruns
            i0 += rec.nitems
            self.forget_upload(rec)
        self.run_top, self.item_top = r0, i0
        self.stale.update(dict.fromkeys([rec.handle for rec in live]))

    def forget_upload(self, rec: RequestState) -> None:
        """Mark ``rec``'s run rows unsent and its bounds failing: its next window goes
        through the slow path, which sends them."""
        rec.fresh = True
        rec.lo, rec.hi, rec.smax = NO_LIMIT, -1, -1
        self.stale[rec.handle] = None

    def sync_req(self) -> None:
        """Write the rows of ``req`` that changed since the last sync (one assignment): the
        array fill reads ``req``; the Python fill reads the records and needs none."""
        stale, recs = self.stale, self.recs
        hs = list(stale)
        self.req[hs] = [NEVER if recs[h] is None else self.req_row(recs[h]) for h in hs]
        stale.clear()

    def check_live(self, h) -> None:
        if isinstance(h, (bool, np.bool_)) or not isinstance(h, (int, np.integer)) or not (
                0 < h <= self.max_requests and self.recs[int(h)] is not None):
            raise UnknownHandleError(f"{h!r} is not the handle of a registered request")

    @staticmethod
    def req_row(rec: RequestState) -> tuple:
        """``rec``'s row of ``req``: its bounds and run slots."""
        return (0, rec.lo, 0, 0, rec.hi, rec.smax, rec.run0, rec.run0 + rec.nruns)


def _int_list(values) -> list:
    """Handles as a list of Python ints (a list, tuple, numpy array or CPU tensor)."""
    if type(values) is list and set(map(type, values)) <= {int}:
        return values
    from mmassembler.step_inputs import int_array

    return int_array(values, "handles").tolist()


_RUN0 = operator.attrgetter("run0")
_SOURCE = operator.itemgetter(0)  # a held source's tensor
