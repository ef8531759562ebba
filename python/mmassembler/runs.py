"""A request's items as position-ordered runs, checked and built once at registration.

A run ``(first position, end position, first row, item)`` says that positions
``first + i`` take rows ``row + i`` of the item's embedding. Spans without an
``embed_mask`` become runs in a fixed number of numpy operations for the whole request;
items with a mask go through ``Item.layout`` (their runs skip the unembedded positions).
Runs of interleaved items are merged into one position order, and adjacent runs that
continue each other are coalesced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from mmassembler.batch import Item
from mmassembler.errors import SpanError

NO_LIMIT = np.iinfo(np.int64).max // 4  # a position no prompt reaches


class RequestRuns(NamedTuple):
    """``runs [k, 4]`` (item = index into the request's items), and per item its embedding
    rows and the end of its last embedded position (0 when it embeds none)."""

    runs: np.ndarray
    rows: np.ndarray
    ends: np.ndarray


def _span_error(items: Sequence, j: int, message: str) -> SpanError:
    key = getattr(items[j], "key", None)
    try:
        hash(key)
    except TypeError:
        key = None
    return SpanError(f"items[{j}]: {message}", item_key=key)


def _flatten(items: Sequence) -> tuple[list, list]:
    """``[(start, end, item)]`` of every span, and the indices of masked items."""
    flat, masked = [], []
    for j, it in enumerate(items):
        if not isinstance(it, Item):
            raise SpanError(f"items[{j}] is a {type(it).__name__}, not an mmassembler.Item")
        try:
            hash(it.key)
        except TypeError:
            raise _span_error(items, j, f"its key {it.key!r} is not hashable") from None
        k = len(flat)
        try:
            for s, e in it.spans:
                flat.append((s, e, j))
        except (TypeError, ValueError):
            raise _span_error(items, j, f"spans must be (start, end) pairs, got {it.spans!r}") from None
        if len(flat) == k:
            raise _span_error(items, j, "an item needs at least one span")
        if it.embed_mask is not None:
            masked.append(j)
    return flat, masked


def _as_array(flat: list, items: Sequence) -> np.ndarray:
    """The spans as int64, rejecting bools, floats and values past int64."""
    if not all(type(s) is int and type(e) is int for s, e, _ in flat):
        for s, e, j in flat:
            for v in (s, e):
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                    raise _span_error(items, j, f"span ({s!r}, {e!r}): positions must be ints")
    try:
        return np.array(flat, dtype=np.int64).reshape(len(flat), 3)
    except OverflowError:
        raise SpanError("a span position does not fit in 64 bits") from None


def request_runs(items: Sequence, prompt_len: int | None) -> RequestRuns:
    """Check a request's items and build its runs; raises ``SpanError`` naming the item."""
    flat, masked = _flatten(items)
    n = len(items)
    if not flat:
        return RequestRuns(np.zeros((0, 4), np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64))
    arr = _as_array(flat, items)
    s, e, j = arr[:, 0], arr[:, 1], arr[:, 2]
    bad = (s < 0) | (e < s) | (e >= (NO_LIMIT if prompt_len is None else prompt_len))
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        where = "past the prompt of %s positions" % prompt_len if e[k] >= s[k] >= 0 else "invalid"
        raise _span_error(items, int(j[k]), f"span ({s[k]}, {e[k]}) is {where}")
    unordered = (j[1:] == j[:-1]) & (s[1:] <= e[:-1])
    if unordered.any():
        k = int(np.flatnonzero(unordered)[0]) + 1
        raise _span_error(items, int(j[k]), f"span ({s[k]}, {e[k]}) is out of order or overlaps "
                          f"the span ending at {e[k - 1]}")
    order = np.argsort(s, kind="stable")
    overlap = s[order[1:]] <= e[order[:-1]]
    if overlap.any():
        k = int(np.flatnonzero(overlap)[0])
        a, b = order[k], order[k + 1]
        raise _span_error(items, int(j[b]), f"span ({s[b]}, {e[b]}) overlaps span ({s[a]}, {e[a]}) "
                          f"of items[{j[a]}]")
    lengths = e - s + 1
    starts = np.flatnonzero(np.r_[True, j[1:] != j[:-1]])  # first span of each item
    excl = np.cumsum(lengths) - lengths
    row0 = excl - np.repeat(excl[starts], np.diff(np.r_[starts, len(j)]))
    rows = np.zeros(n, np.int64)
    ends = np.zeros(n, np.int64)
    rows[j[starts]] = np.add.reduceat(lengths, starts)
    ends[j[starts]] = np.maximum.reduceat(e, starts) + 1
    runs = np.stack((s, e + 1, row0, j), axis=1)[order]
    if masked:
        runs = runs[~np.isin(runs[:, 3], masked)]
        extra = []
        for m in masked:
            lay = items[m].layout()
            rows[m] = lay.num_rows
            ends[m] = lay.runs[-1, 1] if lay.num_rows else 0
            extra.append(np.column_stack((lay.runs, np.full(len(lay.runs), m, np.int64))))
        runs = np.concatenate([runs, *extra])
        runs = runs[np.argsort(runs[:, 0], kind="stable")]
    return RequestRuns(_coalesce(runs), rows, ends)


def _coalesce(runs: np.ndarray) -> np.ndarray:
    """Merge runs of one item where the next one continues both positions and rows."""
    if len(runs) < 2:
        return runs
    pos, end, row, item = runs.T
    joins = (item[1:] == item[:-1]) & (end[:-1] == pos[1:]) & (row[:-1] + end[:-1] - pos[:-1] == row[1:])
    if not joins.any():
        return runs
    first = np.flatnonzero(np.r_[True, ~joins])
    last = np.r_[first[1:] - 1, len(runs) - 1]
    return np.stack((pos[first], end[last], row[first], item[first]), axis=1)
