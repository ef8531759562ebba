"""A stateless batch of ``Request``s as one step of the step kernel: its tables.

Each request's items are checked and turned into position-ordered runs by ``run_lists``,
the builder ``Assembler.add_request`` registers with, once per ``Request`` (``with_window``
hands them on). A call keeps the runs its windows reach and writes the step table, in a
fixed number of numpy operations over those runs; the kernel clips runs to windows, so no
host path cuts items to chunks. Only the items those runs read get a source: a request
whose items all carry embeddings keeps them checked, with their source entries, per
(widths, device), so its items cost array slices; other items go through ``resolve``,
the resolver the ``Assembler`` uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from mmassembler.batch import Request
from mmassembler.cache import EmbeddingCache
from mmassembler.errors import AssemblyError, BatchShapeError, ChunkWindowError, SpanError
from mmassembler.resolve import Wanted, checked_embedding, precomputed, resolve
from mmassembler.runs import run_lists
from mmkernels import layout as L


class RequestRuns:
    """A request's runs (``HOST_RUN_*`` rows; item = index into its items), the embedding
    rows of each item, and, when every item carries an embedding, their checked sources
    and entries for the last (widths, device) asked."""

    __slots__ = ("runs", "rows", "precomputed", "_sources")

    def __init__(self, runs: np.ndarray, rows: np.ndarray, precomputed: bool):
        self.runs, self.rows, self.precomputed = runs, rows, precomputed
        self._sources = None  # (widths, device, sources, entries), or those with None: unusable

    def sources(self, r: int, items: Sequence, widths: tuple, device: torch.device):
        """Every item's checked source and ``[n, SOURCE_FIELDS]`` entries, or ``None`` when
        some item's embedding does not pass (its error is raised if a window reaches it)."""
        memo = self._sources
        if memo is None or memo[0] != widths or memo[1] != device:
            try:
                pairs = []
                for j, (it, n) in enumerate(zip(items, self.rows.tolist())):
                    pairs.append(checked_embedding(it, n, widths, device)
                                 or precomputed(Wanted(j, it, n, r), widths, device))
            except AssemblyError:
                memo = (widths, device, None, None)
            else:
                entries = np.array([e for _, e in pairs], np.int64).reshape(len(pairs), L.SOURCE_FIELDS)
                memo = (widths, device, [t for t, _ in pairs], entries)
            self._sources = memo
        return None if memo[2] is None else memo[2:]


class RequestStep(NamedTuple):
    """A batch's step: the runs its windows reach (item = the item's slot in the batch:
    the request's first slot plus its index), the filled step table and token count, the
    requests with their runs, each request's first slot, and how many runs it reaches."""

    runs: np.ndarray
    table: np.ndarray
    num_tokens: int
    requests: Sequence[Request]
    per: list[RequestRuns]
    first_item: np.ndarray
    reached: np.ndarray

    @property
    def num_items(self) -> int:
        """Item slots of the batch (reached or not)."""
        return int(self.first_item[-1] + len(self.per[-1].rows)) if self.per else 0

    def reached_items(self, among: np.ndarray | None = None):
        """``(slots, request, index in it, rows)`` of the items the runs read, by slot;
        with ``among`` (a flag per request), only those of flagged requests."""
        flag = np.zeros(self.num_items, bool)
        flag[self.runs[:, L.HOST_RUN_ITEM]] = True
        count = len(self.per)
        owner = np.repeat(np.arange(count), [len(x.rows) for x in self.per])
        if among is not None:
            flag &= among[owner]
        slots = np.flatnonzero(flag)
        owner = owner[slots]
        rows = np.concatenate([x.rows for x in self.per])[slots]
        return slots, owner, slots - self.first_item[owner], rows


def request_runs(r: int, req: Request) -> RequestRuns:
    """The runs of request ``r``, checked and built on its first use and kept on it."""
    found = req._runs
    if found is None:
        try:
            runs, meta = run_lists(req.items, req.prompt_len)
        except SpanError as exc:
            raise exc.naming(r) from None
        found = RequestRuns(np.array(runs, np.int64).reshape(len(runs), L.HOST_RUN_FIELDS),
                            np.array([m[0] for m in meta], np.int64),
                            all(it.embedding is not None for it in req.items))
        object.__setattr__(req, "_runs", found)
    return found


def _window(r: int, req: Request) -> tuple[int, int]:
    """Request ``r``'s window ``[lo, hi)``, checked against its prompt."""
    lo, n, pl = req.prefix_len, req.extend_len, req.prompt_len
    if type(lo) is not int or type(n) is not int or lo < 0 or n < 0:  # fast path: plain ints
        for name in ("prefix_len", "extend_len"):
            v = getattr(req, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ChunkWindowError(f"{name} must be a non-negative int, got {v!r}", request=r)
        lo, n = int(lo), int(n)
    if pl is not None:
        if isinstance(pl, bool) or not isinstance(pl, (int, np.integer)) or pl < 0:
            raise ChunkWindowError(f"prompt_len must be a non-negative int or None, got {pl!r}",
                                   request=r)
        if lo + n > pl:
            raise ChunkWindowError(f"chunk [{lo}, {lo + n}) runs past the prompt of {pl} positions",
                                   request=r)
    return lo, lo + n


def request_step(requests: Sequence[Request]) -> RequestStep:
    """Check the requests (types, windows, spans) and build their step; nothing is resolved.

    Items wholly in the prefix or the future, and items whose positions in the window all
    keep their text embedding, are not reached (so never read nor encoded).
    """
    windows, per = [], []
    for r, req in enumerate(requests):
        if not isinstance(req, Request):
            raise BatchShapeError(f"requests[{r}] is a {type(req).__name__}, not a Request", request=r)
        windows.append(_window(r, req))
        per.append(request_runs(r, req))
    count = len(requests)
    table = np.zeros((L.step_rows(count), L.STEP_FIELDS), np.int64)
    if count == 0:
        none = np.zeros(0, np.int64)
        return RequestStep(np.zeros((0, L.HOST_RUN_FIELDS), np.int64), table, 0, requests, per,
                           none, none)
    win = np.array(windows, np.int64)
    k = np.fromiter((len(x.runs) for x in per), np.int64, count)
    m = np.fromiter((len(x.rows) for x in per), np.int64, count)
    first_item = np.cumsum(m) - m  # each request's first item slot
    runs = per[0].runs if count == 1 else np.concatenate([x.runs for x in per])
    owner = np.repeat(np.arange(count), k)
    at = win[owner]  # each run's window
    hit = (runs[:, L.HOST_RUN_POS] < at[:, 1]) & (runs[:, L.HOST_RUN_END] > at[:, 0])
    runs, owner = runs[hit], owner[hit]  # a new array: its item column may be rewritten
    runs[:, L.HOST_RUN_ITEM] += first_item[owner]
    reached = np.bincount(owner, minlength=count)
    req_rows = table[1:count + 1]
    req_rows[:, L.STEP_PREFIX:L.STEP_STOP + 1] = win
    np.cumsum(win[:, 1] - win[:, 0], out=table[2:count + 2, L.STEP_BASE])  # row 1's base is 0
    np.cumsum(reached, out=req_rows[:, L.STEP_RUN_END])
    req_rows[:, L.STEP_RUN_FIRST] = req_rows[:, L.STEP_RUN_END] - reached
    n = table.item(count + 1, L.STEP_BASE)
    table[0, L.STEP_TOKENS], table[0, L.STEP_REQUESTS] = n, count
    return RequestStep(runs, table, n, requests, per, first_item, reached)


def step_sources(step: RequestStep, *, encoders: Mapping | None, cache: EmbeddingCache | None,
                 device: torch.device, widths: tuple, stream=None) -> tuple[list, np.ndarray]:
    """A source for each item slot the runs read and the ``[slots, SOURCE_FIELDS]``
    entries (others: ``None`` and unset rows); raises before the cache changes
    (``resolve``'s rules). A request whose items all carry embeddings fills its slots
    from its kept sources; the reached items of other requests go through ``resolve``."""
    total = step.num_items
    sources: list = [None] * total
    entries = np.empty((total, L.SOURCE_FIELDS), np.int64)
    rest = None
    first = step.first_item.tolist()
    for r in np.flatnonzero(step.reached).tolist():
        per = step.per[r]
        memo = per.sources(r, step.requests[r].items, widths, device) if per.precomputed else None
        if memo is None:
            if rest is None:
                rest = np.zeros(len(step.per), bool)
            rest[r] = True
            continue
        f = first[r]
        sources[f:f + len(memo[0])] = memo[0]
        entries[f:f + len(memo[0])] = memo[1]
    if rest is not None:
        slots, owner, index, rows = step.reached_items(rest)
        requests = step.requests
        wanted = [Wanted(s, requests[r].items[j], nrows, r) for s, r, j, nrows in zip(
            slots.tolist(), owner.tolist(), index.tolist(), rows.tolist())]
        found, found_entries = resolve(wanted, encoders=encoders, cache=cache, device=device,
                                       widths=widths, stream=stream)
        for s, t in zip(slots.tolist(), found):
            sources[s] = t
        entries[slots] = found_entries
    return sources, entries
