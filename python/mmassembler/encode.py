"""Encoder batching: one call per modality for the whole batch, split by what it returned.

The items of a batch that overlap their chunk and have neither a precomputed embedding
nor a cache entry are deduped by key and passed to their modality's encoder together
(optionally in budgeted micro-batches). The output is split by the rows the encoder
actually returned -- never by placeholder counts -- and every count is checked against
the rows the item's placeholders take before anything is cached or written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mmassembler.batch import Item
from mmassembler.embeddings import as_rows
from mmassembler.errors import BatchShapeError, EncoderOutputError, RowCountError


EncoderOutput = Sequence[torch.Tensor] | tuple[torch.Tensor, Sequence[int]]
EncoderFn = Callable[[list[Item]], EncoderOutput]



@dataclass(frozen=True)
class Encoder:
    """An encoder callable with optional per-call budgets.

    ``fn(items)`` returns one tensor per item, or ``(tensor, rows_per_item)`` with the
    items' rows concatenated. ``max_items`` / ``max_rows`` cap one call; more calls
    are made when the batch needs more. Outputs are copied into tensors the library owns
    (an encoder may reuse its buffers) unless ``stable``: the caller keeps them unchanged
    while they may be read (an engine's own encoder cache), so they are read in place, must
    already be on the output's device, and are not put in the ``EmbeddingCache``.
    """

    fn: EncoderFn
    max_items: int | None = None
    max_rows: int | None = None
    stable: bool = False

    def __post_init__(self):
        for name in ("max_items", "max_rows"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise BatchShapeError(f"Encoder {name} must be a positive int or None, got {v!r}")

    def batches(self, needs: list["_Need"]) -> list[list["_Need"]]:
        """Split ``needs`` into calls that respect the budgets (an item is never split)."""
        calls, cur, cur_rows = [], [], 0
        for need in needs:
            full = (self.max_items is not None and len(cur) >= self.max_items) or (
                self.max_rows is not None and cur and cur_rows + need.rows > self.max_rows)
            if full:
                calls.append(cur)
                cur, cur_rows = [], 0
            cur.append(need)
            cur_rows += need.rows
        if cur:
            calls.append(cur)
        return calls


@dataclass
class _Need:
    """One distinct key to encode and the planned items waiting for it."""

    key: int
    item: Item
    rows: int
    waiting: list[int] = field(default_factory=list)  # indices of the wanted items
    requests: list[int] = field(default_factory=list)


def _check_rows(t: torch.Tensor, need: _Need, modality: str) -> None:
    if t.shape[0] != need.rows:
        raise RowCountError(
            f"the {modality} encoder returned {t.shape[0]} rows but the item's placeholders take "
            f"{need.rows} (requests {sorted(set(need.requests))}); nothing was written or cached",
            request=need.requests[0], item_key=need.key, expected=need.rows, returned=t.shape[0])


def _row_counts(rows_per_item, modality: str, first: _Need) -> list[int]:
    """An encoder's ``rows_per_item``: a 1-D sequence of ints (list, tuple, array, tensor)."""
    if isinstance(rows_per_item, torch.Tensor):
        rows_per_item = rows_per_item.tolist() if rows_per_item.dim() == 1 else None
    elif isinstance(rows_per_item, np.ndarray):
        rows_per_item = rows_per_item.tolist() if rows_per_item.ndim == 1 else None
    if not isinstance(rows_per_item, (list, tuple)) or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in rows_per_item):
        raise EncoderOutputError(
            f"the {modality} encoder returned (tensor, rows_per_item) with rows_per_item "
            f"{rows_per_item!r}; expected a 1-D sequence of ints, one per item",
            request=first.requests[0], item_key=first.key)
    return [int(n) for n in rows_per_item]


def _split(result, call: list[_Need], modality: str, widths: Sequence[int]) -> list[torch.Tensor]:
    """Split one encoder call's output into per-item tensors, checking every count."""
    first = call[0]
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.Tensor)
            and not (isinstance(result[1], torch.Tensor) and result[1].is_floating_point())):
        tensor, rows_per_item = result
        rows_per_item = _row_counts(rows_per_item, modality, first)
        if len(rows_per_item) != len(call):
            raise EncoderOutputError(
                f"the {modality} encoder returned rows for {len(rows_per_item)} items, "
                f"but was given {len(call)}", request=first.requests[0], item_key=first.key,
                expected=len(call), returned=len(rows_per_item))
        tensor = as_rows(tensor, widths, request=first.requests[0], key=first.key,
                         what=f"the {modality} encoder's output")
        if sum(rows_per_item) != tensor.shape[0] or min(rows_per_item) < 0:
            raise EncoderOutputError(
                f"the {modality} encoder returned {tensor.shape[0]} rows but rows_per_item "
                f"{rows_per_item} add up to {sum(rows_per_item)}", request=first.requests[0],
                item_key=first.key, expected=sum(rows_per_item), returned=tensor.shape[0])
        parts = list(torch.split(tensor, rows_per_item))
    elif isinstance(result, (list, tuple)):
        if len(result) != len(call):
            missing = call[len(result)] if len(result) < len(call) else call[-1]
            raise EncoderOutputError(
                f"the {modality} encoder returned {len(result)} tensors for {len(call)} items",
                request=missing.requests[0], item_key=missing.key, expected=len(call),
                returned=len(result))
        parts = [as_rows(t, widths, request=n.requests[0], key=n.key,
                         what=f"the {modality} encoder's output") for t, n in zip(result, call)]
    else:
        raise EncoderOutputError(
            f"the {modality} encoder returned a {type(result).__name__}; expected a list with one "
            "tensor per item or (tensor, rows_per_item)", request=first.requests[0],
            item_key=first.key)
    for t, need in zip(parts, call):
        _check_rows(t, need, modality)
    return parts
