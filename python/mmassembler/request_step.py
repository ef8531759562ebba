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
from mmassembler.resolve import Wanted, precomputed, resolve
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
                pairs = [precomputed(Wanted(j, it, n, r), widths, device)
                         for j, (it, n) in enumerate(zip(items, self.rows.tolist()))]
            except AssemblyError:
                memo = (widths, device, None, None)
            else:
                entries = np.array([e for _, e in pairs], np.int64).reshape(len(pairs), L.SOURCE_FIELDS)
                memo = (widths, device, [t for t, _ in pairs], entries)
            self._sources = memo
        return None if memo[2] is None else memo[2:]


class RequestStep(NamedTuple):
    """A batch's step: the runs its windows reach (item = index into the reached items),
    the filled step table and its token count; the reached items as batch item slots
    (sorted), with their request, index in it and rows."""

    runs: np.ndarray
    table: np.ndarray
    num_tokens: int
    requests: Sequence[Request]
    per: list[RequestRuns]
    slots: np.ndarray
    owner: np.ndarray
    index: np.ndarray
    rows: np.ndarray


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
                           none, none, none, none)
    win = np.array(windows, np.int64)
    p, q = win[:, 0], win[:, 1]
    stops = np.cumsum(q - p)
    n = int(stops[-1])
    k = np.fromiter((len(x.runs) for x in per), np.int64, count)
    m = np.fromiter((len(x.rows) for x in per), np.int64, count)
    runs = np.concatenate([x.runs for x in per])
    owner = np.repeat(np.arange(count), k)
    hit = (runs[:, L.HOST_RUN_POS] < q[owner]) & (runs[:, L.HOST_RUN_END] > p[owner])
    runs, owner = runs[hit], owner[hit]  # a new array: its item column may be rewritten
    first_item = np.cumsum(m) - m
    slots, local = np.unique(runs[:, L.HOST_RUN_ITEM] + first_item[owner], return_inverse=True)
    runs[:, L.HOST_RUN_ITEM] = local
    reached = np.bincount(owner, minlength=count)
    req_rows = table[1:count + 1]
    req_rows[:, L.STEP_BASE] = stops - (q - p)
    req_rows[:, L.STEP_PREFIX], req_rows[:, L.STEP_STOP] = p, q
    np.cumsum(reached, out=req_rows[:, L.STEP_RUN_END])
    req_rows[:, L.STEP_RUN_FIRST] = req_rows[:, L.STEP_RUN_END] - reached
    table[0, L.STEP_TOKENS], table[0, L.STEP_REQUESTS] = n, count
    table[count + 1, L.STEP_BASE] = n
    slot_owner = np.repeat(np.arange(count), m)[slots]
    item_rows = np.concatenate([x.rows for x in per])[slots]
    return RequestStep(runs, table, n, requests, per, slots, slot_owner,
                       slots - first_item[slot_owner], item_rows)


def step_sources(step: RequestStep, *, encoders: Mapping | None, cache: EmbeddingCache | None,
                 device: torch.device, widths: tuple, stream=None) -> tuple[list, np.ndarray]:
    """A source for each reached item and their ``[n, SOURCE_FIELDS]`` entries, in slot
    order; raises before the cache changes (``resolve``'s rules)."""
    n = len(step.slots)
    sources: list = [None] * n
    entries = np.empty((n, L.SOURCE_FIELDS), np.int64)
    owners = step.owner.tolist()
    # reached items by request: slots are sorted, so each request's are one range
    bounds = np.flatnonzero(np.diff(step.owner)) + 1 if n else step.owner
    starts = [0, *bounds.tolist()]
    ends = [*bounds.tolist(), n]
    rest = []
    for a, b in zip(starts, ends):
        if a == b:
            continue
        r = owners[a]
        per = step.per[r]
        memo = per.sources(r, step.requests[r].items, widths, device) if per.precomputed else None
        if memo is None:
            rest.extend(range(a, b))
            continue
        idx = step.index[a:b]
        entries[a:b] = memo[1][idx]
        every = memo[0]
        sources[a:b] = [every[j] for j in idx.tolist()]
    if rest:
        requests = step.requests
        wanted = [Wanted(i, requests[owners[i]].items[j], nrows, owners[i]) for i, j, nrows in zip(
            rest, step.index[rest].tolist(), step.rows[rest].tolist())]
        found, found_entries = resolve(wanted, encoders=encoders, cache=cache, device=device,
                                       widths=widths, stream=stream)
        for i, t in zip(rest, found):
            sources[i] = t
        entries[rest] = found_entries
    return sources, entries
