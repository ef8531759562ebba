"""Embedding tensors on their way in: checked as rows, given source entries, and owned.

Every source the library reads -- a precomputed embedding, a cache entry, an encoder's
output -- passes through here, so one set of checks decides what is usable. A batch of
tensors is checked in one pass over their attributes (no call per tensor beyond its
address and strides); only tensors that need a change (a higher rank, strided columns,
autograd) or fail take the one-by-one path, which fixes or raises. Encoder outputs the
library must own are copied into one block per encoder call (``own_block``), and items
read that block through their row offsets.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import torch

from mmassembler.errors import EmbeddingFormatError, RowCountError
from mmkernels import layout as L
from mmkernels import KIND_OF_DTYPE, SUPPORTED_DTYPES, anchor_addresses

FLOATS = SUPPORTED_DTYPES
_ESIZE = {L.KIND_F32: 4, L.KIND_F16: 2, L.KIND_BF16: 2}
Naming = Callable[[int], tuple]  # index in a batch -> (request, item key) for errors


def as_rows(t, widths: Sequence[int], *, request: int | None, key, what: str) -> torch.Tensor:
    """View an embedding as 2-D ``[rows, width]`` (higher rank read as ``reshape(-1, width)``)."""
    if not isinstance(t, torch.Tensor):
        raise EmbeddingFormatError(f"{what} is a {type(t).__name__}, not a torch.Tensor",
                                   request=request, item_key=key)
    if t.requires_grad:
        t = t.detach()  # assembly is inference: no autograd graph is kept or returned
    if t.dtype not in FLOATS:
        raise EmbeddingFormatError(f"{what} has dtype {t.dtype}; expected one of "
                                   f"{[str(d) for d in FLOATS]}", request=request, item_key=key)
    shape = t.shape
    if len(shape) < 2 or shape[-1] not in widths:
        raise EmbeddingFormatError(f"{what} has shape {list(shape)}; its last dimension must be "
                                   f"the hidden size {sorted(set(widths))[0]}"
                                   + (f" or {max(widths)} (with deepstack)" if len(set(widths)) > 1
                                      else ""), request=request, item_key=key)
    if t.device.type == "meta":
        raise EmbeddingFormatError(f"{what} is on the meta device: it has no values",
                                   request=request, item_key=key)
    if t.data_ptr() % t.element_size():
        raise EmbeddingFormatError(f"{what} starts at an address that is not a multiple of its "
                                   f"{t.element_size()}-byte elements", request=request, item_key=key)
    if len(shape) > 2:
        t = t.reshape(-1, shape[-1])
    if shape[-1] > 1 and t.stride(1) != 1:
        t = t.contiguous()  # the kernel reads rows with unit column stride
    return t


def check_row_count(t: torch.Tensor, rows: int, *, request: int | None, key, what: str) -> None:
    """An embedding has exactly the rows its item's placeholders take."""
    if t.shape[0] != rows:
        raise RowCountError(f"{what} has {t.shape[0]} rows but the item's placeholders take {rows}",
                            request=request, item_key=key, expected=rows, returned=t.shape[0])


def entries_of(ptrs: list, strides: list, kinds: list, cols: list, hidden: int,
               device: torch.device) -> list[tuple]:
    """Source entries (``SOURCE_*`` tuples) of 2-D sources with unit column stride, from
    their addresses, row strides, kind codes and widths (Python ints)."""
    anchors = anchor_addresses(device)
    return [((p - anchors[k]) // _ESIZE[k], s, k, c,
             int(not ((p - anchors[k]) % 16 or (s * _ESIZE[k]) % 16 or (hidden * _ESIZE[k]) % 16)))
            for p, s, k, c in zip(ptrs, strides, kinds, cols)]


_TENSORS = {torch.Tensor, torch.nn.Parameter}
_FLOAT_SET = frozenset(SUPPORTED_DTYPES)


def _plain(ts: list, rows: list, widths: tuple, device: torch.device | None):
    """``(dtypes, shapes, strides, addresses)`` when every tensor is a plain source as it
    is: a ``torch.Tensor`` of a supported float dtype, 2-D with ``rows`` rows and a known
    width, unit column stride, on ``device`` (any device when ``None``); ``None``
    otherwise. One pass over attributes, two calls a tensor. (A tensor that requires grad
    is read as it is: assembly makes no autograd graph.)"""
    if not set(map(type, ts)) <= _TENSORS:
        return None
    if device is None or device.type == "cuda":
        info = [(t.dtype, t.shape, t.stride(), t.data_ptr(), t.is_cuda) for t in ts]
    else:
        info = [(t.dtype, t.shape, t.stride(), t.data_ptr(), t.is_cpu) for t in ts]
    dtypes, shapes, strides, ptrs, here = zip(*info)
    if (set(map(len, shapes)) != {2} or not set(dtypes) <= _FLOAT_SET or 0 in ptrs
            or (device is not None and (False in here or (device.type == "cuda" and _several_gpus()
                                                           and {t.get_device() for t in ts} != {device.index})))):
        return None
    if list(map(_ROWS, shapes)) != rows:
        return None
    w0, w1 = widths
    for (_, c), (_, cs) in zip(shapes, strides):
        if (c != w0 and c != w1) or (cs != 1 and c != 1):
            return None
    return dtypes, shapes, strides, ptrs


_ROWS = operator.itemgetter(0)


@functools.lru_cache(maxsize=None)
def _several_gpus() -> bool:
    return torch.cuda.device_count() > 1


def checked_sources(ts: list, rows: list, widths: tuple, device: torch.device | None,
                    naming: Naming, what: str) -> tuple[list, list | None]:
    """Tensors checked as the sources of items that take ``rows`` rows each: ``(2-D
    views, source entries)``; raises a typed error naming the first bad one's request and
    item. Plain 2-D tensors (``_plain``) cost a pass over attributes and two calls each
    (strides, address); the rest go one by one through ``as_rows``, which fixes or
    raises. With ``device=None`` any device is accepted and no entries are made
    (outputs to be copied)."""
    n = len(ts)
    found = _plain(ts, rows, widths, device) if n else None
    if found is None:
        ts = [_one(t, r, widths, device, naming(i), what) for i, (t, r) in enumerate(zip(ts, rows))]
        if device is None or not n:
            return ts, None if device is None else []
        found = _plain(ts, rows, widths, device)
    if device is None:
        return ts, None
    dtypes, shapes, strides, ptrs = found
    kinds = [KIND_OF_DTYPE[d] for d in dtypes]
    for i, (p, k) in enumerate(zip(ptrs, kinds)):
        if p % _ESIZE[k]:
            request, key = naming(i)
            raise EmbeddingFormatError(f"{what} starts at an address that is not a multiple of its "
                                       "element size", request=request, item_key=key)
    return ts, entries_of(ptrs, list(map(_ROWS, strides)), kinds, [sh[1] for sh in shapes], widths[0], device)


def _one(t, rows: int, widths, device, name: tuple, what: str) -> torch.Tensor:
    """One tensor through every check (and fix) of ``as_rows``, its device and rows."""
    request, key = name
    t = as_rows(t, widths, request=request, key=key, what=what)
    if device is not None and t.device != device:
        raise EmbeddingFormatError(f"{what} is on {t.device}, the output on {device}",
                                   request=request, item_key=key)
    check_row_count(t, rows, request=request, key=key, what=what)
    return t


def own_block(parts: list, device: torch.device, name: tuple) -> tuple[torch.Tensor, list]:
    """Copy 2-D ``parts`` (one width) into one block on ``device`` that nothing else writes
    to (an encoder may reuse its buffers; a cache entry must not change under it): one
    ``torch.cat`` (a launch per up to 128 inputs), or one copy of a single tensor. Returns
    the block and each part's first row in it. Mixed dtypes promote to one that holds them
    all exactly (a float16 and a bfloat16 part give float32). A copy that fails (a meta
    tensor, an unreachable device) is an ``EmbeddingFormatError`` naming ``name``'s request
    and item, raised before the cache changes."""
    starts = [0] * len(parts)
    at = 0
    for i, p in enumerate(parts):
        starts[i] = at
        at += p.shape[0]
    try:  # the copy keeps no autograd history: its result is detached
        if len(parts) == 1:
            block = parts[0].detach().to(device=device, copy=True)
        else:
            block = torch.cat(parts).to(device)
    except (RuntimeError, NotImplementedError) as exc:
        raise EmbeddingFormatError(f"the encoder's output on {parts[0].device} could not be copied to "
                                   f"{device}: {exc}", request=name[0], item_key=name[1]) from None
    return block.detach(), starts


def block_entries(block: torch.Tensor, starts: list, hidden: int) -> list[tuple]:
    """Source entries of the items whose rows start at ``starts`` in a 2-D ``block``."""
    stride = block.stride(0) if block.shape[0] > 1 else block.shape[1]
    kind = KIND_OF_DTYPE[block.dtype]
    delta = block.data_ptr() - anchor_addresses(block.device)[kind]
    esize = _ESIZE[kind]
    cols = block.shape[1]
    unaligned = (stride * esize) % 16 or (hidden * esize) % 16
    step = stride * esize
    return [((delta + s * step) // esize, stride, kind, cols, int(not (unaligned or (delta + s * step) % 16)))
            for s in starts]
