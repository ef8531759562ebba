"""Encoder batching: one call per modality for a step's misses, split by what it returned.

The items of a step whose window reaches them first and that have neither a precomputed
embedding nor a cache entry are deduped by (modality, key) and passed to their
modality's encoder together (optionally in budgeted calls). The output is split by the
rows the encoder actually returned -- never by placeholder counts -- and every count is
checked against the rows the item's placeholders take before anything is cached or
written. What a call returns is copied into one block the library owns (one copy per
call, never one per item), unless the encoder is ``stable``: its outputs are read in
place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmassembler.embeddings import as_rows, block_entries, checked_sources, own_block
from mmassembler.errors import BatchShapeError, EncoderOutputError, RowCountError

EncoderOutput = Sequence[torch.Tensor] | tuple[torch.Tensor, Sequence[int]]
EncoderFn = Callable[[list], EncoderOutput]


@dataclass(frozen=True)
class Encoder:
    """An encoder callable with optional per-call budgets.

    ``fn(items)`` returns one tensor per item, a ``[items, rows, hidden]`` tensor, or
    ``(tensor, rows_per_item)`` with the items' rows concatenated. ``max_items`` / ``max_rows`` cap one call; more calls
    are made when the batch needs more. Outputs are copied into one block the library
    owns per call (an encoder may reuse its buffers) unless ``stable``: the caller keeps
    them unchanged while they may be read (an engine's own encoder cache), so they are
    read in place, must already be on the output's device, and are not put in the
    ``EmbeddingCache``. Cache entries are keyed by ``identity`` (the object whose outputs
    they are: ``fn`` unless given, e.g. the model method a wrapper calls), the modality
    and the item key, so two models never read each other's rows.
    """

    fn: EncoderFn
    max_items: int | None = None
    max_rows: int | None = None
    stable: bool = False
    identity: object = None  # what cache entries are keyed by (default ``fn``; see ``encoder_token``)

    def __post_init__(self):
        if not callable(self.fn):
            raise BatchShapeError(f"Encoder needs a callable items -> embeddings, got {self.fn!r:.80}")
        for name in ("max_items", "max_rows"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise BatchShapeError(f"Encoder {name} must be a positive int or None, got {v!r}")

    def calls(self, rows: list[int]) -> list[slice]:
        """Split items needing ``rows`` rows each into calls within the budgets (an item is
        never split): slices of the list."""
        if self.max_items is None and self.max_rows is None:
            return [slice(0, len(rows))]
        calls, start, cur_rows = [], 0, 0
        for i, r in enumerate(rows):
            full = (self.max_items is not None and i - start >= self.max_items) or (
                self.max_rows is not None and i > start and cur_rows + r > self.max_rows)
            if full:
                calls.append(slice(start, i))
                start, cur_rows = i, 0
            cur_rows += r
        calls.append(slice(start, len(rows)))
        return calls


def as_encoder(enc) -> Encoder:
    """``enc`` as an ``Encoder`` (a bare callable gets no budgets, and a light wrapper)."""
    return enc if type(enc) is Encoder else _Bare(enc)


class _Bare:
    """A bare encoder callable read as an ``Encoder`` with no budgets (made per step: one
    call, where a checked ``Encoder`` costs several)."""

    __slots__ = ("fn",)
    max_items = max_rows = identity = None
    stable = False
    calls = Encoder.calls

    def __init__(self, fn):
        self.fn = fn


def _row_counts(rows_per_item, modality: str, name: tuple) -> list[int]:
    """An encoder's ``rows_per_item``: a 1-D sequence of ints (list, tuple, array, tensor)."""
    if isinstance(rows_per_item, torch.Tensor):
        rows_per_item = rows_per_item.tolist() if rows_per_item.dim() == 1 else None
    elif isinstance(rows_per_item, np.ndarray):
        rows_per_item = rows_per_item.tolist() if rows_per_item.ndim == 1 else None
    if not isinstance(rows_per_item, (list, tuple)) or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in rows_per_item):
        raise EncoderOutputError(
            f"the {modality} encoder returned (tensor, rows_per_item) with rows_per_item "
            f"{rows_per_item!r:.200}; expected a 1-D sequence of ints, one per item",
            request=name[0], item_key=name[1])
    return [int(n) for n in rows_per_item]


def encode_call(enc: Encoder, objs: list, rows: list, modality: str, widths: tuple,
                device: torch.device, naming) -> tuple[list, list, list, list]:
    """Call ``enc`` once on ``objs`` (items needing ``rows`` rows each) and check what it
    returned: ``(sources, first rows, source entries, blocks)``. Each item's rows start at
    its first row of its source: a block the library owns (``blocks``: one per call, what
    the cache may keep), or, for a stable encoder, what the encoder returned, read in
    place. ``naming(i)`` names item ``i``'s request and key in errors; everything raises
    before anything changes."""
    result = enc.fn(objs)
    first = naming(0)
    n = len(objs)
    if isinstance(result, torch.Tensor) and result.dim() == 3 and result.shape[0] == n:
        result = (result.reshape(-1, result.shape[-1]), [result.shape[1]] * n)  # [items, rows, hidden]
    what = f"the {modality} encoder's output"
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.Tensor)
            and not (isinstance(result[1], torch.Tensor) and result[1].is_floating_point())):
        tensor, per = result
        per = _row_counts(per, modality, first)
        if len(per) != n:
            raise EncoderOutputError(f"the {modality} encoder returned rows for {len(per)} items, "
                                     f"but was given {n}", request=first[0], item_key=first[1],
                                     expected=n, returned=len(per))
        tensor = as_rows(tensor, widths, request=first[0], key=first[1], what=what)
        if sum(per) != tensor.shape[0] or min(per, default=0) < 0:
            raise EncoderOutputError(
                f"the {modality} encoder returned {tensor.shape[0]} rows but rows_per_item "
                f"{per} add up to {sum(per)}", request=first[0], item_key=first[1],
                expected=sum(per), returned=tensor.shape[0])
        _check_counts(per, rows, modality, naming)
        starts, at = [], 0
        for k in per:
            starts.append(at)
            at += k
        if enc.stable:
            checked_sources([tensor], [tensor.shape[0]], widths, device, naming, what)
            return [tensor] * n, starts, block_entries(tensor, starts, widths[0]), []
        block, _ = own_block([tensor], device, first)
        return [block] * n, starts, block_entries(block, starts, widths[0]), [block]
    if not isinstance(result, (list, tuple)):
        raise EncoderOutputError(
            f"the {modality} encoder returned a {type(result).__name__}; expected a list with one "
            "tensor per item or (tensor, rows_per_item)", request=first[0], item_key=first[1])
    if len(result) != n:
        missing = naming(min(len(result), n - 1))
        raise EncoderOutputError(f"the {modality} encoder returned {len(result)} tensors for {n} items",
                                 request=missing[0], item_key=missing[1], expected=n,
                                 returned=len(result))
    if enc.stable:
        parts, entries = checked_sources(list(result), rows, widths, device, naming, what)
        return parts, [0] * n, entries, []
    parts, _ = checked_sources(list(result), rows, widths, None, naming, what)
    if len({p.shape[1] for p in parts}) == 1 and len({p.device for p in parts}) == 1:
        block, starts = own_block(parts, device, first)
        return [block] * n, starts, block_entries(block, starts, widths[0]), [block]
    sources: list = [None] * n
    first_rows = [0] * n
    entries: list = [None] * n
    blocks = []
    groups: dict = {}
    for i, p in enumerate(parts):  # one block per width and source device (rare: mixed outputs)
        groups.setdefault((p.shape[1], p.device), []).append(i)
    for idx in groups.values():
        block, starts = own_block([parts[i] for i in idx], device, naming(idx[0]))
        blocks.append(block)
        for i, s, e in zip(idx, starts, block_entries(block, starts, widths[0])):
            sources[i], first_rows[i], entries[i] = block, s, e
    return sources, first_rows, entries, blocks


def _check_counts(returned: list, rows: list, modality: str, naming) -> None:
    if returned != rows:
        i = next(i for i, (a, b) in enumerate(zip(returned, rows)) if a != b)
        request, key = naming(i)
        raise RowCountError(
            f"the {modality} encoder returned {returned[i]} rows but the item's placeholders take "
            f"{rows[i]}; nothing was written or cached", request=request, item_key=key,
            expected=int(rows[i]), returned=int(returned[i]))
