"""New requests' items as position-ordered runs, checked and built in plain Python.

A run ``(first position, end position, first row, item)`` says that positions
``first + i`` take rows ``row + i`` of the item's embedding. A batch of new requests is
read as columns (``NewRequests``: one list per field, one entry per item, filled by
comprehensions from ``Item``s or straight from an engine's objects), and ``build_runs``
checks every span and builds each request's runs as lists: spans sorted and disjoint
within an item, inside the prompt, items of a request never sharing a position;
interleaved items merged into one position order, adjacent runs of one item coalesced.
Items with an ``embed_mask`` are laid out one by one (``items.layout_of``; an ``Item``
keeps its layout). Registering is the work of a step with new requests, so it makes no
array operation: a numpy call on a tiny array costs more than the Python it replaces.
"""

from __future__ import annotations

from collections.abc import Sequence
import operator
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch

from mmassembler.errors import BatchShapeError, SpanError
from mmassembler.items import Item, layout_of

# A position no prompt reaches (prompts are shorter), small enough that a step's windows,
# each at most this long, add up without overflow for up to MAX_REQUESTS requests.
NO_LIMIT = 1 << 40
MAX_REQUESTS = 1 << 20


class NewRequests(NamedTuple):
    """Columns of a batch of new requests: per request its item count and prompt length
    (``NO_LIMIT``: unknown); per item (requests' items in order) its key, spans (inclusive
    ``(start, end)`` pairs), embed mask (or ``None``), modality, precomputed embedding (or
    ``None``) and the object its encoder is handed."""

    counts: list
    prompts: list
    keys: list
    spans: list
    masks: list
    modality: list
    embedding: list
    objs: list


def _bad_pair(requests) -> int | None:
    """Index of the first entry that is not an ``(items, prompt_len)`` pair, or ``None``."""
    for i, r in enumerate(requests):
        if not isinstance(r, (tuple, list)) or len(r) != 2:
            return i
    return None


def _check_prompt(p, request: int | None) -> None:
    """``None`` or an int in ``[0, NO_LIMIT]``."""
    if p is not None and (isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer))
                          or not 0 <= p <= NO_LIMIT):
        raise BatchShapeError(f"prompt_len must be None or an int in [0, 2**40], got {p!r}",
                              request=request)


def request_columns(requests) -> NewRequests:
    """``[(items, prompt_len), ...]`` (lists or tuples of ``Item``s) as ``NewRequests``;
    raises ``BatchShapeError`` or ``SpanError`` naming the request."""
    if not isinstance(requests, (list, tuple)):
        raise BatchShapeError(f"requests must be a list of (items, prompt_len) pairs, got "
                              f"{type(requests).__name__}")
    try:
        pairs = set(map(len, requests)) <= {2}
    except TypeError:
        pairs = False
    if not pairs:
        bad = _bad_pair(requests)
        raise BatchShapeError(f"requests[{bad}] is {requests[bad]!r:.80}; expected an (items, "
                              "prompt_len) pair", request=bad)
    lists, prompts = zip(*requests) if requests else ((), ())
    if not set(map(type, lists)) <= {list, tuple}:
        i = next(i for i, x in enumerate(lists) if not isinstance(x, (list, tuple)))
        raise BatchShapeError(f"requests[{i}]: items must be a list or tuple of Items, got "
                              f"{type(lists[i]).__name__}", request=i)
    if None in prompts:
        prompts = [NO_LIMIT if p is None else p for p in prompts]
    if prompts and (not set(map(type, prompts)) <= {int} or min(prompts) < 0 or max(prompts) > NO_LIMIT):
        for i, p in enumerate(prompts):
            _check_prompt(p, i)
        prompts = [int(p) for p in prompts]
    items = list(chain.from_iterable(lists))
    if not set(map(type, items)) <= {Item}:
        counts = list(map(len, lists))
        j = next(j for j, it in enumerate(items) if not isinstance(it, Item))
        r = int(np.searchsorted(np.cumsum(counts), j, side="right"))
        raise SpanError(f"items[{j - sum(counts[:r])}] is a {type(items[j]).__name__}, not an "
                        "mmassembler.Item", request=r)
    return NewRequests(list(map(len, lists)), list(prompts), [it.key for it in items],
                       [it.spans for it in items], [it.embed_mask for it in items],
                       [it.modality for it in items], [it.embedding for it in items], items)


class BuiltRuns:
    """A batch's runs and items as Python lists (what its requests' registry records share).

    Runs are position-ordered and disjoint within a request: positions ``rpos[k] ..
    rend[k] - 1`` take rows ``rrow[k] ..`` of item ``ritem[k]`` (the item's index in its
    request). Request ``r``'s runs are ``ra[r] .. ra[r] + nruns[r] - 1``. Per item: its
    embedding rows and the end of its last embedded position (0 when it embeds none).
    ``simple[r]``: run ``k`` of request ``r`` is its item ``k`` read from row 0 (every item
    one run, in order); ``rrow`` and ``ritem`` are ``None`` when every request is simple.
    """

    __slots__ = ("rpos", "rend", "rrow", "ritem", "rows", "iend", "ra", "nruns", "simple")

    @property
    def total_runs(self) -> int:
        return len(self.rpos)


def _span_error(new: NewRequests, item: int, message: str, cls: type = SpanError) -> SpanError:
    """A ``SpanError`` (or ``cls``) for batch item ``item``, named by its index in its request."""
    counts = new.counts
    r, first = 0, 0
    while first + counts[r] <= item:
        first += counts[r]
        r += 1
    key = new.keys[item]
    try:
        hash(key)
    except TypeError:
        key = None
    prefix = f"requests[{r}]: " if len(counts) > 1 else ""
    return cls(f"{prefix}items[{item - first}]: {message}", request=r, item_key=key)


def _position(v, new, j) -> int:
    """An int position (numpy ints and integer 0-d tensors read as ints; never a bool or a float)."""
    try:
        if isinstance(v, (bool, np.bool_)) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
            raise TypeError
        v = operator.index(v)
    except TypeError:
        raise _span_error(new, j, f"span positions must be ints, got {v!r}") from None
    if not -NO_LIMIT <= v <= NO_LIMIT:
        raise _span_error(new, j, f"span position {v} is past any prompt (2**40)")
    return int(v)


def _normalised(new: NewRequests, j: int) -> list:
    """Item ``j``'s spans as ``(start, end)`` pairs of Python ints (its types checked)."""
    try:
        pairs = [tuple(p) for p in new.spans[j]]
        if any(len(p) != 2 for p in pairs):
            raise TypeError
    except TypeError:
        raise _span_error(new, j, f"spans must be (start, end) pairs, got {new.spans[j]!r:.80}") from None
    return [(_position(s, new, j), _position(e, new, j)) for s, e in pairs]


def _single_int_spans(spans: list):
    """``(starts, ends)`` when every item has exactly one ``(start, end)`` pair of Python
    ints (what engines send), else ``None``. A fixed number of calls for the batch."""
    try:
        if set(map(len, spans)) != {1}:
            return None
        pairs = list(map(_FIRST, spans))
        if set(map(len, pairs)) != {2}:
            return None
        starts, ends = list(map(_FIRST, pairs)), list(map(_SECOND, pairs))
    except TypeError:
        return None
    if not set(map(type, starts)) | set(map(type, ends)) <= {int}:
        return None
    return starts, ends


_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


def build_runs(new: NewRequests) -> BuiltRuns:
    """Check the batch's spans, masks and keys and build its runs (see the module doc);
    raises ``SpanError`` / ``EmbedMaskError`` naming the request (when there are several)
    and item, before anything is registered.

    Plain Python, no array operation: a batch where every item is one span of ints and a
    request's items come in position order (what engines send) costs a few operations per
    item and no call; other requests are laid out one by one (``_general``)."""
    n, m = len(new.keys), len(new.counts)
    try:
        set(new.keys)
    except TypeError:
        j = next(j for j, k in enumerate(new.keys) if not _hashable(k))
        raise _span_error(new, j, f"its key {new.keys[j]!r:.80} is not hashable") from None
    single = None if (n and new.masks.count(None) != n) else _single_int_spans(new.spans) if n else ([], [])
    general: dict = {}  # request -> its runs, laid out one by one
    first = 0
    for r, (c, limit) in enumerate(zip(new.counts, new.prompts)):
        stop = first + c
        if single is not None:
            starts, ends = single
            prev, j = -1, first
            while j < stop:  # ordered, disjoint, non-empty and inside the prompt
                s, e = starts[j], ends[j]
                if s <= prev or e < s or e >= limit:
                    break
                prev = e
                j += 1
            if j == stop:
                first = stop
                continue
        general[r] = _general(new, first, stop, limit)
        first = stop
    out = BuiltRuns()
    if not general:  # every request simple: runs are items
        starts, ends = single if single is not None else ([], [])
        out.rpos, out.rend = starts, [e + 1 for e in ends]
        out.rows, out.iend = [e - s for s, e in zip(out.rpos, out.rend)], out.rend
        out.rrow = out.ritem = None
        out.ra, out.nruns, out.simple = _offsets(new.counts), new.counts, [True] * m
        return out
    rpos, rend, rrow, ritem, rows, iend, ra, nruns, simple = [], [], [], [], [], [], [], [], []
    first = 0
    for r, c in enumerate(new.counts):
        ra.append(len(rpos))
        g = general.get(r)
        if g is None:
            starts, ends = single
            rpos += starts[first:first + c]
            end = [e + 1 for e in ends[first:first + c]]
            rend += end
            rrow += [0] * c
            ritem += range(c)
            rows += [e - s for s, e in zip(starts[first:first + c], end)]
            iend += end
            nruns.append(c)
            simple.append(True)
        else:
            gpos, gend, grow, gitem, grows, giend, gsimple = g
            rpos += gpos
            rend += gend
            rrow += grow
            ritem += gitem
            rows += grows
            iend += giend
            nruns.append(len(gpos))
            simple.append(gsimple)
        first += c
    out.rpos, out.rend, out.rrow, out.ritem, out.rows, out.iend = rpos, rend, rrow, ritem, rows, iend
    out.ra, out.nruns, out.simple = ra, nruns, simple
    return out


def _offsets(counts: list) -> list:
    """Where each count's range starts when the ranges are laid end to end."""
    out, at = [0] * len(counts), 0
    for i, c in enumerate(counts):
        out[i] = at
        at += c
    return out


def _general(new: NewRequests, first: int, stop: int, limit: int) -> tuple:
    """``(rpos, rend, rrow, ritem, rows, iend, simple)`` of one request (see ``BuiltRuns``),
    laid out item by item: several spans, masks, items out of position
    order (sorted into one position order; an item's adjacent runs coalesced)."""
    runs, rows, iend = [], [], []
    for j in range(first, stop):
        spans = _normalised(new, j)
        if not spans:
            raise _span_error(new, j, "an item needs at least one span")
        prev = -1
        for s, e in spans:
            if s < 0 or e < s:
                raise _span_error(new, j, f"span ({s}, {e}) is invalid")
            if e >= limit:
                raise _span_error(new, j, f"span ({s}, {e}) is past the prompt of {limit} positions")
            if s <= prev:
                raise _span_error(new, j, f"span ({s}, {e}) is out of order or overlaps the span ending "
                                          f"at {prev}")
            prev = e
        if new.masks[j] is None:
            row = 0
            for s, e in spans:
                runs.append((s, e + 1, row, j - first))
                row += e - s + 1
            rows.append(row)
            iend.append(spans[-1][1] + 1)
            continue
        lay = _layout(new, j, spans)
        for s, e, row in lay.runs.tolist():
            runs.append((s, e, row, j - first))
        rows.append(lay.num_rows)
        iend.append(int(lay.runs[-1, 1]) if lay.num_rows else 0)
    runs.sort()
    merged: list = []
    for run in runs:
        if merged:
            ps, pe, prow, pj = merged[-1]
            if run[0] < pe:
                b = run[3] + first
                raise _span_error(new, b, f"positions {run[0]}..{run[1] - 1} overlap positions {ps}..{pe - 1} "
                                          f"of items[{pj}]")
            if run[3] == pj and run[0] == pe and run[2] == prow + pe - ps:
                merged[-1] = (ps, run[1], prow, pj)
                continue
        merged.append(run)
    c = stop - first
    simple = len(merged) == c and all(r[3] == k and r[2] == 0 for k, r in enumerate(merged))
    return ([r[0] for r in merged], [r[1] for r in merged], [r[2] for r in merged], [r[3] for r in merged], rows,
            iend, simple)


def _hashable(key) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _layout(new: NewRequests, j: int, spans: list):
    """The layout of masked item ``j`` (kept on an ``Item``), errors naming its request."""
    obj = new.objs[j]
    try:
        if type(obj) is Item:
            return obj.layout()
        return layout_of(new.keys[j], spans, new.masks[j])
    except SpanError as exc:
        raise _span_error(new, j, exc.message, type(exc)) from None


def check_items_type(items: Sequence) -> None:
    """Raise unless ``items`` is a list or tuple (a generator would be consumed)."""
    if not isinstance(items, (list, tuple)):
        raise BatchShapeError(f"items must be a list or tuple of Items, got {type(items).__name__}")
