"""Embedding tensors on their way in: viewed as rows, checked, and owned.

Every source the library reads -- a precomputed embedding, a cache entry, an encoder's
output -- passes through here, on both paths (the stateless ``assemble`` and the
``Assembler``), so one set of checks decides what is usable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmassembler.errors import EmbeddingFormatError, RowCountError

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def as_rows(t, widths: Sequence[int], *, request: int, key: int, what: str) -> torch.Tensor:
    """View an embedding as 2-D ``[rows, width]`` (higher rank read as ``reshape(-1, width)``)."""
    if not isinstance(t, torch.Tensor):
        raise EmbeddingFormatError(f"{what} is a {type(t).__name__}, not a torch.Tensor",
                                   request=request, item_key=key)
    if t.requires_grad:
        t = t.detach()  # assembly is inference: no autograd graph is kept or returned
    if t.dtype not in _FLOATS:
        raise EmbeddingFormatError(f"{what} has dtype {t.dtype}; expected one of "
                                   f"{[str(d) for d in _FLOATS]}", request=request, item_key=key)
    shape = t.shape  # read once: every step's first chunk checks each new item here
    if len(shape) < 2 or shape[-1] not in widths:
        raise EmbeddingFormatError(f"{what} has shape {list(shape)}; its last dimension must be "
                                   f"the hidden size {sorted(set(widths))[0]}"
                                   + (f" or {max(widths)} (with deepstack)" if len(set(widths)) > 1
                                      else ""), request=request, item_key=key)
    if t.data_ptr() % t.element_size():
        raise EmbeddingFormatError(f"{what} starts at an address that is not a multiple of its "
                                   f"{t.element_size()}-byte elements", request=request, item_key=key)
    if len(shape) > 2:
        t = t.reshape(-1, shape[-1])
    if shape[-1] > 1 and t.stride(1) != 1:
        t = t.contiguous()  # the kernel reads rows with unit column stride
    return t


def fits(t, rows: int, widths: Sequence[int], device: torch.device) -> bool:
    """A cache entry usable for an item: 2-D float rows of a known width on ``device``."""
    return (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == rows
            and t.shape[1] in widths and t.dtype in _FLOATS and t.device == device
            and (t.shape[1] <= 1 or t.stride(1) == 1))


def owned(t: torch.Tensor, device: torch.device, need: object | None = None) -> torch.Tensor:
    """A detached copy of ``t`` on ``device`` that nothing else writes to (an encoder may
    hand out views of a buffer it reuses; a cache entry must not change under it).

    A copy that fails (a meta tensor, an unreachable device) is an ``EmbeddingFormatError``
    naming ``need``'s request and item, raised before the cache changes.
    """
    t = t.detach()
    try:  # copy=True: `to` on the same device (also "cuda" vs "cuda:0") would return t itself
        return t.to(device=device, copy=True)
    except (RuntimeError, NotImplementedError) as exc:
        raise EmbeddingFormatError(
            f"the encoder's output on {t.device} could not be copied to {device}: {exc}",
            request=need.requests[0] if need else None, item_key=need.key if need else None) from None


def kept(t: torch.Tensor, device: torch.device, need: object | None, stable: bool) -> torch.Tensor:
    """An encoder's output as the step keeps it: ``owned`` (a copy), or for a ``stable``
    encoder the tensor itself, detached, which must already be on ``device``."""
    if not stable:
        return owned(t, device, need)
    if t.device != device:
        raise EmbeddingFormatError(f"the stable encoder's output is on {t.device}, the output on {device}",
                                   request=need.requests[0] if need else None,
                                   item_key=need.key if need else None)
    return t.detach()


def precomputed_rows(embedding, widths: Sequence[int], device: torch.device, *, request: int | None,
                     key) -> torch.Tensor:
    """A precomputed embedding as checked rows on ``device`` (its row count is checked by
    ``check_row_count``, every time it is used)."""
    t = as_rows(embedding, widths, request=request, key=key, what="the precomputed embedding")
    if t.device != device:
        raise EmbeddingFormatError(f"the precomputed embedding is on {t.device}, the output on "
                                   f"{device}", request=request, item_key=key)
    return t


def check_row_count(t: torch.Tensor, rows: int, *, request: int | None, key) -> None:
    """A precomputed embedding has exactly the rows its item's placeholders take."""
    if t.shape[0] != rows:
        raise RowCountError(f"the precomputed embedding has {t.shape[0]} rows but the item's "
                            f"placeholders take {rows}", request=request, item_key=key,
                            expected=rows, returned=t.shape[0])
