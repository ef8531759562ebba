"""New requests' items as position-ordered runs, checked and built in array operations.

A run ``(first position, end position, first row, item)`` says that positions
``first + i`` take rows ``row + i`` of the item's embedding. A batch of new requests is
read as columns (``NewRequests``: one list per field, one entry per item, filled by
comprehensions from ``Item``s or straight from an engine's objects), and ``build_runs``
checks every span and builds every run of the batch in a fixed number of numpy
operations: spans sorted and disjoint within an item, inside the prompt, items of a
request never sharing a position; interleaved items merged into one position order,
adjacent runs of one item coalesced. Items with an ``embed_mask`` are laid out one by
one (``items.layout_of``; an ``Item`` keeps its layout). Spans given as anything but
Python ints are normalised one item at a time first.
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
_REQUEST_SHIFT = 41  # a run's sort key: request << 41 | position (positions < 2**40)


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


class BuiltRuns(NamedTuple):
    """A batch's runs (``HOST_RUN_*`` rows, item = the item's index in the batch, grouped
    by request in order, position-ordered within), runs per request, and per item its
    embedding rows and the end of its last embedded position (0 when it embeds none)."""

    runs: np.ndarray
    run_counts: np.ndarray
    rows: np.ndarray
    ends: np.ndarray
    counts: np.ndarray  # items per request
    prompts: np.ndarray  # prompt length per request (NO_LIMIT: unknown)


def _span_error(new: NewRequests, item: int, message: str, owner: np.ndarray,
                cls: type = SpanError) -> SpanError:
    """A ``SpanError`` (or ``cls``) for batch item ``item``, named by its index in its request."""
    r = int(owner[item])
    first = sum(new.counts[:r])
    key = new.keys[item]
    try:
        hash(key)
    except TypeError:
        key = None
    several = len(new.counts) > 1
    prefix = f"requests[{r}]: " if several else ""
    return cls(f"{prefix}items[{item - first}]: {message}", request=r, item_key=key)


def _position(v, new, j, owner) -> int:
    """An int position (numpy ints and integer 0-d tensors read as ints; never a bool or a float)."""
    try:
        if isinstance(v, (bool, np.bool_)) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
            raise TypeError
        v = operator.index(v)
    except TypeError:
        raise _span_error(new, j, f"span positions must be ints, got {v!r}", owner) from None
    if not -NO_LIMIT <= v <= NO_LIMIT:
        raise _span_error(new, j, f"span position {v} is past any prompt (2**40)", owner)
    return int(v)


def _normalised(new: NewRequests, j: int, owner) -> list:
    """Item ``j``'s spans as ``(start, end)`` pairs of Python ints (its types checked)."""
    try:
        pairs = [tuple(p) for p in new.spans[j]]
        if any(len(p) != 2 for p in pairs):
            raise TypeError
    except TypeError:
        raise _span_error(new, j, f"spans must be (start, end) pairs, got {new.spans[j]!r:.80}",
                          owner) from None
    return [(_position(s, new, j, owner), _position(e, new, j, owner)) for s, e in pairs]


def _flat_spans(new: NewRequests, owner: np.ndarray) -> tuple[np.ndarray, list]:
    """Every span of the batch as ``[S, 2]`` int64 (start, inclusive end) and spans per item."""
    spans = new.spans
    try:
        nspan = list(map(len, spans))
        pairs = list(chain.from_iterable(spans))
        values = list(chain.from_iterable(pairs))
        plain = set(map(len, pairs)) <= {2} and set(map(type, values)) <= {int}
    except TypeError:
        plain = False
    if plain:
        try:
            return np.fromiter(values, np.int64, len(values)).reshape(-1, 2), nspan
        except OverflowError:
            pass
    spans = [_normalised(new, j, owner) for j in range(len(spans))]
    return np.array(list(chain.from_iterable(spans)), np.int64).reshape(-1, 2), list(map(len, spans))


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def build_runs(new: NewRequests) -> BuiltRuns:
    """Check the batch's spans and masks and build its runs (see the module doc); raises
    ``SpanError`` / ``EmbedMaskError`` naming the request (when there are several) and item.

    A fixed number of array operations for the batch: the common case (each item one
    span, each request's items in position order) skips the per-item span grouping and
    the sort, and only an interleaved or multi-span batch pays for them."""
    m, n = len(new.counts), len(new.keys)
    counts = np.fromiter(new.counts, np.int64, m)
    owner = _AR[:m].repeat(counts) if m <= _AR_N else np.arange(m).repeat(counts)  # each item's request
    try:
        list(map(hash, new.keys))
    except TypeError:
        j = next(j for j, k in enumerate(new.keys) if not _hashable(k))
        raise _span_error(new, j, f"its key {new.keys[j]!r:.80} is not hashable", owner) from None
    limit = np.fromiter(new.prompts, np.int64, m)
    se, nspan = _flat_spans(new, owner)
    s, e = se[:, 0], se[:, 1]
    one = len(se) == n  # every item has one span (no item has none: checked below)
    if one and 0 not in nspan:
        item = np.arange(n)
        bad = (s < 0) | (e < s) | (e >= limit[owner])
        if True in bad:
            _raise_span(new, owner, s, e, item, bad, np.ones(n, bool), np.ones(n, np.int64), limit)
        row, rows, ends = np.zeros(n, np.int64), e - s + 1, e + 1
    else:
        nspan = np.fromiter(nspan, np.int64, n)
        item = np.arange(n).repeat(nspan)
        first_span = nspan.cumsum() - nspan
        # every span inside its prompt and ordered after the item's previous one
        bad = (s < 0) | (e < s) | (e >= limit[owner[item]])
        after = np.ones(len(s), bool)
        after[1:] = (item[1:] != item[:-1]) | (s[1:] > e[:-1])
        if True in bad or False in after or 0 in nspan:
            _raise_span(new, owner, s, e, item, bad, after, nspan, limit)
        length = e - s + 1
        csum = length.cumsum() - length
        row = csum - csum[first_span][item]
        rows = np.add.reduceat(length, first_span) if n else np.zeros(0, np.int64)
        ends = e[first_span + nspan - 1] + 1 if n else np.zeros(0, np.int64)
    pos, end, run_item = s, e + 1, item
    if False in [mk is None for mk in new.masks]:  # ``is``: masks may be tensors (no __eq__ per mask)
        masked = [j for j, mk in enumerate(new.masks) if mk is not None]
        keep = np.ones(n, bool)
        keep[masked] = False
        plain = keep[item]
        lays = [_layout(new, j, owner) for j in masked]
        extra = np.concatenate([lay.runs for lay in lays]).reshape(-1, 3)
        which = np.array(masked, np.int64).repeat([len(lay.runs) for lay in lays])
        pos = np.concatenate((s[plain], extra[:, 0]))
        end = np.concatenate((e[plain] + 1, extra[:, 1]))
        row = np.concatenate((row[plain], extra[:, 2]))
        run_item = np.concatenate((item[plain], which))
        rows[masked] = [lay.num_rows for lay in lays]
        ends[masked] = [int(lay.runs[-1, 1]) if lay.num_rows else 0 for lay in lays]
        one = False
    req = owner[run_item]
    key = (req << _REQUEST_SHIFT) | pos
    if len(key) > 1 and True in (key[1:] < key[:-1]):  # interleaved or unordered items
        order = key.argsort(kind="stable")
        pos, end, row, run_item, req = pos[order], end[order], row[order], run_item[order], req[order]
        key = key[order]
    # sorted: a run overlaps another of its request when it starts before the previous one
    # ends (keyed like the starts: a run of the next request always starts after it)
    if len(key) > 1 and True in (key[1:] < (key + (end - pos))[:-1]):
        same = req[1:] == req[:-1]
        k = int((same & (pos[1:] < end[:-1])).nonzero()[0][0])
        a, b = int(run_item[k]), int(run_item[k + 1])
        raise _span_error(new, b, f"positions {pos[k + 1]}..{end[k + 1] - 1} overlap positions "
                          f"{pos[k]}..{end[k] - 1} of items[{a - sum(new.counts[:int(owner[a])])}]",
                          owner)
    runs = np.empty((len(pos), 4), np.int64)
    if not one:
        # a run that continues the previous one (same item, next position, next row) joins it
        joins = (run_item[1:] == run_item[:-1]) & (pos[1:] == end[:-1]) & (row[1:] == row[:-1] + end[:-1] - pos[:-1])
        if True in joins:
            starts = np.concatenate(([True], ~joins)).nonzero()[0]
            last = np.concatenate((starts[1:], [len(pos)])) - 1
            pos, end, row, run_item, req = pos[starts], end[last], row[starts], run_item[starts], req[starts]
            runs = np.empty((len(pos), 4), np.int64)
    runs[:, 0], runs[:, 1], runs[:, 2], runs[:, 3] = pos, end, row, run_item
    run_counts = counts if one else np.bincount(req, minlength=m)
    return BuiltRuns(runs, run_counts, rows, ends, counts, limit)


_AR_N = 1 << 12
_AR = np.arange(_AR_N)


def _hashable(key) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _layout(new: NewRequests, j: int, owner: np.ndarray):
    """The layout of masked item ``j`` (kept on an ``Item``), errors naming its request."""
    obj = new.objs[j]
    try:
        if type(obj) is Item:
            return obj.layout()
        return layout_of(new.keys[j], new.spans[j], new.masks[j])
    except SpanError as exc:
        raise _span_error(new, j, exc.message, owner, type(exc)) from None


def _raise_span(new, owner, s, e, item, bad, after, nspan, limit) -> None:
    """Raise the error of the first bad span (or spanless item) of the batch."""
    none = np.flatnonzero(nspan == 0)
    candidates = []
    if len(none):
        candidates.append((int(none[0]), "an item needs at least one span"))
    if bad.any():
        k = _first(bad)
        j = int(item[k])
        lim = int(limit[owner[j]])
        where = f"past the prompt of {lim} positions" if 0 <= s[k] <= e[k] else "invalid"
        candidates.append((j, f"span ({s[k]}, {e[k]}) is {where}"))
    if not after.all():
        k = _first(~after)
        candidates.append((int(item[k]), f"span ({s[k]}, {e[k]}) is out of order or overlaps the "
                                         f"span ending at {e[k - 1]}"))
    j, message = min(candidates)
    raise _span_error(new, j, message, owner)


def check_items_type(items: Sequence) -> None:
    """Raise unless ``items`` is a list or tuple (a generator would be consumed)."""
    if not isinstance(items, (list, tuple)):
        raise BatchShapeError(f"items must be a list or tuple of Items, got {type(items).__name__}")
