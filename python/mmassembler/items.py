"""The data model: items (one image, video or audio clip) and requests (one prompt chunk).

Both are frozen. An item with an ``embed_mask`` keeps its layout (its runs of embedded
positions), computed on first use; unmasked items are laid out with their request
(``mmassembler.runs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmassembler.errors import EmbedMaskError, SpanError


@dataclass(frozen=True)
class ItemLayout:
    """Where an item's embedding rows go, as runs of consecutive positions.

    ``runs[k] = (first position, end position (exclusive), first embedding row)``:
    positions ``first + i`` take rows ``row + i``. Runs are sorted and disjoint.
    """

    runs: np.ndarray
    num_rows: int


@dataclass(frozen=True, eq=False)
class Item:
    """One multimodal item of a request.

    Parameters
    ----------
    key : int
        The engine's hash of the item's content; the cache and encoder dedupe by it.
    spans : sequence of (int, int)
        Inclusive ``(start, end)`` prompt positions of its placeholders, sorted, disjoint.
    modality : str
        Picks the encoder (``encoders[modality]``).
    embedding : torch.Tensor, optional
        Precomputed rows (``[rows, hidden]``, or higher rank read as ``[-1, width]``),
        read in place (a contiguous copy where its columns are strided) while a window
        can reach the item: do not write to it, resize or re-point it meanwhile.
    data : Any
        Whatever the modality's encoder needs (pixels, features, ...).
    embed_mask : sequence of bool, optional
        One entry per placeholder position in span order; False positions keep their
        text embedding and take no embedding row.
    """

    key: int
    spans: Sequence[tuple[int, int]]
    modality: str = "image"
    embedding: torch.Tensor | None = None
    data: Any = None
    embed_mask: Any = None
    _layout: ItemLayout | None = field(default=None, init=False, repr=False, compare=False)

    def layout(self, request: int | None = None) -> ItemLayout:
        """The item's runs, computed and checked once (errors name ``request``)."""
        if self._layout is None:
            object.__setattr__(self, "_layout", layout_of(self.key, self.spans, self.embed_mask, request))
        return self._layout

    @property
    def num_rows(self) -> int:
        """Embedding rows the item takes (positions whose mask is True)."""
        return self.layout().num_rows


@dataclass(frozen=True, eq=False)
class Request:
    """One request's chunk: prompt positions ``[prefix_len, prefix_len + extend_len)``.

    ``prompt_len``, when given, lets spans and the window be checked against the prompt.
    """

    items: Sequence[Item]
    prefix_len: int
    extend_len: int
    prompt_len: int | None = None

    def with_window(self, prefix_len: int, extend_len: int) -> "Request":
        """The same request and items at another chunk window."""
        return Request(self.items, prefix_len, extend_len, self.prompt_len)


def _as_int(value, what: str, request: int | None, key: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SpanError(f"{what} must be an int, got {value!r}", request=request, item_key=key)
    return int(value)


def layout_of(key, spans, embed_mask, request: int | None = None) -> ItemLayout:
    """Check an item's spans and mask and turn them into runs."""
    try:
        pairs = [tuple(s) for s in spans]
    except TypeError:
        raise SpanError(f"spans must be a sequence of (start, end) pairs, got {spans!r}",
                        request=request, item_key=key) from None
    if not pairs:
        raise SpanError("an item needs at least one span", request=request, item_key=key)
    starts, ends = [], []
    prev_end = -1
    for pair in pairs:
        if len(pair) != 2:
            raise SpanError(f"span {pair!r} is not a (start, end) pair", request=request, item_key=key)
        s = _as_int(pair[0], "span start", request, key)
        e = _as_int(pair[1], "span end", request, key)
        if s < 0:
            raise SpanError(f"span ({s}, {e}) starts before position 0", request=request, item_key=key)
        if e < s:
            raise SpanError(f"span ({s}, {e}) ends before it starts", request=request, item_key=key)
        if s <= prev_end:
            raise SpanError(f"span ({s}, {e}) is out of order or overlaps the span ending at "
                            f"{prev_end}", request=request, item_key=key)
        starts.append(s)
        ends.append(e + 1)
        prev_end = e
    try:
        starts_a = np.array(starts, dtype=np.int64)
        ends_a = np.array(ends, dtype=np.int64)
    except OverflowError:
        raise SpanError("a span position does not fit in 64 bits", request=request, item_key=key) from None
    lengths = ends_a - starts_a
    num_positions = int(lengths.sum())

    if embed_mask is None:
        rows0 = np.cumsum(lengths) - lengths
        runs = np.stack((starts_a, ends_a, rows0), axis=1)
        num_rows = num_positions
    else:
        mask = embed_mask
        if isinstance(mask, torch.Tensor):
            if mask.device.type == "meta":
                raise EmbedMaskError("embed_mask is on the meta device: it has no values",
                                     request=request, item_key=key)
            mask = mask.detach().cpu().numpy()  # once per item; engines keep masks on the host
        mask = np.asarray(mask)
        if mask.ndim != 1 or mask.shape[0] != num_positions:
            raise EmbedMaskError(f"embed_mask has shape {list(mask.shape)}, expected "
                                 f"[{num_positions}] (one entry per placeholder position)",
                                 request=request, item_key=key)
        if mask.dtype != np.bool_:
            if not np.isin(mask, (0, 1)).all():
                raise EmbedMaskError("embed_mask must hold booleans", request=request, item_key=key)
            mask = mask.astype(bool)
        positions = np.repeat(starts_a - (np.cumsum(lengths) - lengths), lengths) + np.arange(
            num_positions, dtype=np.int64)
        embedded = positions[mask]
        num_rows = int(embedded.shape[0])
        if num_rows == 0:
            runs = np.zeros((0, 3), dtype=np.int64)
        else:
            breaks = np.flatnonzero(np.diff(embedded) != 1) + 1
            first_rows = np.concatenate(([0], breaks)).astype(np.int64)
            last_rows = np.concatenate((breaks, [num_rows])).astype(np.int64)
            runs = np.stack((embedded[first_rows], embedded[last_rows - 1] + 1, first_rows), axis=1)
    runs.setflags(write=False)
    return ItemLayout(runs, num_rows)
