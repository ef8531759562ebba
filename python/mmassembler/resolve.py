"""Giving items a source the first step a window reaches them: precomputed, cached, encoded.

Items of one step are resolved together: precomputed embeddings are checked; the rest
are deduped by key, looked up in the cache (with the same checks as a precomputed
embedding), and the misses sent to their modality's encoder once (``Encoder`` budgets
apply), split by the rows the encoder returned. Every count and format is checked before
the cache changes; what is encoded is copied into tensors the library owns (an encoder
may hand out views of a buffer it reuses; a ``stable`` encoder's outputs are read in
place) and detached (assembly is inference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from mmassembler.cache import EmbeddingCache
from mmassembler.embeddings import check_row_count, fits, kept, precomputed_rows
from mmassembler.encode import Encoder, EncoderFn, _Need, _split
from mmassembler.errors import MissingEncoderError, RowCountError


class Wanted(NamedTuple):
    """An item slot that needs a source: its item, rows, and the request naming errors
    (a tuple: one is built per item a step reaches first)."""

    slot: int
    item: object
    rows: int
    request: int  # index of the request in the step


def _precomputed(w: Wanted, widths, device) -> torch.Tensor:
    t = precomputed_rows(w.item.embedding, widths, device, request=w.request, key=w.item.key)
    check_row_count(t, w.rows, request=w.request, key=w.item.key)
    return t


def resolve(wanted: Sequence[Wanted], *, encoders: Mapping[str, EncoderFn | Encoder] | None,
            cache: EmbeddingCache | None, device: torch.device,
            widths: Sequence[int]) -> list[torch.Tensor]:
    """A source for each wanted item, in order; raises before the cache changes."""
    widths = tuple(widths)
    sources: list = [None] * len(wanted)
    needs: dict[tuple, _Need] = {}  # (modality, key) -> one encode
    hits: dict = {}  # key -> cache entry (used)
    stale: list = []  # keys whose cache entry does not fit their item
    for i, w in enumerate(wanted):
        item = w.item
        if item.embedding is not None:
            sources[i] = _precomputed(w, widths, device)
            continue
        ident = (item.modality, item.key)
        need = needs.get(ident)
        if need is not None and need.rows != w.rows:
            first = need.requests[0]
            raise RowCountError(f"two items share key {item.key!r} but take {need.rows} rows "
                                f"(request {first}) and {w.rows} rows (request {w.request})",
                                request=w.request, item_key=item.key, expected=need.rows,
                                returned=w.rows)
        if need is None:
            need = needs[ident] = _Need(item.key, item, w.rows)
        need.waiting.append(i)
        need.requests.append(w.request)
    misses: dict[str, list[_Need]] = {}
    for (modality, key), need in needs.items():
        entry = cache.peek(key) if cache is not None else None
        if entry is not None and fits(entry, need.rows, widths, device):
            hits[key] = entry
            for i in need.waiting:
                sources[i] = entry
            continue
        if entry is not None:
            stale.append(key)
        misses.setdefault(modality, []).append(need)
    for modality, group in misses.items():
        if encoders is None or modality not in encoders:
            raise MissingEncoderError(f"no embedding, no cache entry and no encoder for modality "
                                      f"{modality!r}", request=group[0].requests[0],
                                      item_key=group[0].key)
    encoded: list[tuple[_Need, torch.Tensor, bool]] = []
    for modality, group in misses.items():
        enc = encoders[modality]
        enc = enc if isinstance(enc, Encoder) else Encoder(enc)
        for call in enc.batches(group):
            parts = _split(enc.fn([n.item for n in call]), call, modality, widths)
            encoded.extend((need, t, enc.stable) for need, t in zip(call, parts))
    kept_parts = [(need, kept(t, device, need, stable), stable)  # may fail: before the cache
                  for need, t, stable in encoded]
    if cache is not None:
        for key in stale:
            cache.discard(key, "its rows, width, dtype or device do not fit the item")
        for key in hits:
            cache.get(key)
        for need, t, stable in kept_parts:
            if not stable:
                cache.put(need.key, t)
    for need, t, _ in kept_parts:
        for i in need.waiting:
            sources[i] = t
    return sources
