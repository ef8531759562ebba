"""A request's items as position-ordered runs, checked and built once at registration.

A run ``(first position, end position, first row, item)`` says that positions
``first + i`` take rows ``row + i`` of the item's embedding. Items with an ``embed_mask``
go through ``Item.layout`` (their runs skip the unembedded positions). Runs of
interleaved items are merged into one position order, and adjacent runs of one item that
continue each other are coalesced.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmassembler.batch import Item
from mmassembler.errors import SpanError

# A position no prompt reaches (prompts are shorter), small enough that a step's windows,
# each at most this long, add up without overflow for up to MAX_REQUESTS requests.
NO_LIMIT = 1 << 40
MAX_REQUESTS = 1 << 20


def _span_error(items: Sequence, j: int, message: str) -> SpanError:
    key = getattr(items[j], "key", None)
    try:
        hash(key)
    except TypeError:
        key = None
    return SpanError(f"items[{j}]: {message}", item_key=key)


def _position(v, items: Sequence, j: int) -> int:
    """A span position: an int (numpy ints too), never a bool or a float."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise _span_error(items, j, f"span positions must be ints, got {v!r}")
    return int(v)


def _item_spans(items: Sequence, j: int, limit: int, spans: list) -> tuple[int, int]:
    """Check item ``j`` and append its ``(start, end, item, first row)`` spans; returns its
    rows and the end of its last position (rows as if it had no mask)."""
    it = items[j]
    if not isinstance(it, Item):
        raise SpanError(f"items[{j}] is a {type(it).__name__}, not an mmassembler.Item")
    try:
        hash(it.key)
    except TypeError:
        raise _span_error(items, j, f"its key {it.key!r} is not hashable") from None
    prev, row = -1, 0
    try:
        pairs = list(it.spans)
        for s, e in pairs:
            if type(s) is not int or type(e) is not int:
                s, e = _position(s, items, j), _position(e, items, j)
            if s < 0 or e < s or e >= limit:
                where = f"past the prompt of {limit} positions" if 0 <= s <= e else "invalid"
                raise _span_error(items, j, f"span ({s}, {e}) is {where}")
            if s <= prev:
                raise _span_error(items, j, f"span ({s}, {e}) is out of order or overlaps the "
                                  f"span ending at {prev}")
            spans.append((s, e, j, row))
            row += e - s + 1
            prev = e
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SpanError):
            raise
        raise _span_error(items, j, f"spans must be (start, end) pairs, got {it.spans!r}") from None
    if prev < 0:
        raise _span_error(items, j, "an item needs at least one span")
    return row, prev + 1


def run_lists(items: Sequence, prompt_len: int | None) -> tuple[list, list]:
    """Check a request's items and build them as lists of tuples: its runs (item = index
    into ``items``, sorted by position) and per item ``(embedding rows, end of its last
    embedded position (0 when it embeds none), 0)`` (the last column is the registry's
    owner); raises ``SpanError`` naming the item.

    One plain-Python pass (a request's items are Python objects; numpy's fixed cost per
    call is larger than this work for the few spans most requests have).
    """
    limit = NO_LIMIT if prompt_len is None else prompt_len
    spans: list = []
    n = len(items)
    rows, ends = [0] * n, [0] * n
    masked = set()
    for j in range(n):
        rows[j], ends[j] = _item_spans(items, j, limit, spans)
        if items[j].embed_mask is not None:
            masked.add(j)
            lay = items[j].layout()
            rows[j] = lay.num_rows
            ends[j] = lay.runs_list[-1][1] if lay.num_rows else 0
    spans.sort()
    runs: list = []
    prev = None
    for span in spans:
        s, e, j, row = span
        if j in masked:  # masked spans may overlap others: their embedded positions are checked below
            continue
        if prev is not None and s <= prev[1]:
            raise _span_error(items, j, f"span ({s}, {e}) overlaps span ({prev[0]}, {prev[1]}) of "
                              f"items[{prev[2]}]")
        prev = span
        last = runs[-1] if runs else None
        if last is not None and last[3] == j and last[1] == s and last[2] + s - last[0] == row:
            runs[-1] = (last[0], e + 1, last[2], j)  # continues the previous run: coalesce
        else:
            runs.append((s, e + 1, row, j))
    if masked:
        # Spans of masked items may overlap (Qwen-Omni's audio in video: one range, two
        # items, complementary masks); the positions that take rows may not.
        runs.extend((s, e, r, j) for j in masked for s, e, r in items[j].layout().runs_list)
        runs.sort()
        for a, b in zip(runs, runs[1:]):
            if b[0] < a[1]:
                raise _span_error(items, b[3], f"its embedded positions from {b[0]} overlap those of "
                                  f"items[{a[3]}] (positions {a[0]}..{a[1] - 1})")
    return runs, [(a, b, 0) for a, b in zip(rows, ends)]
