"""Giving items a source the first step a window reaches them: precomputed, cached, encoded.

Items of one step are resolved together: precomputed embeddings are checked; the rest
are deduped by key, looked up in the cache (with the same checks as a precomputed
embedding), and the misses sent to their modality's encoder once (``Encoder`` budgets
apply), split by the rows the encoder returned. Every count and format is checked before
the cache changes; what is encoded is copied into tensors the library owns (an encoder
may hand out views of a buffer it reuses; a ``stable`` encoder's outputs are read in
place) and detached (assembly is inference). Each source comes with its source entry
(``mmkernels.tables.source_entry``); a precomputed embedding's checks and entry are made
once per item and kept on it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from mmassembler.cache import EmbeddingCache
from mmassembler.embeddings import check_row_count, fits, kept, precomputed_rows
from mmassembler.encode import Encoder, EncoderFn, _Need, _split
from mmassembler.errors import MissingEncoderError, RowCountError
from mmkernels.tables import anchor_addresses, source_entry

logger = logging.getLogger(__name__)


class Wanted(NamedTuple):
    """An item slot that needs a source: its item, rows, and the request naming errors
    (a tuple: one is built per item a step reaches first)."""

    slot: int
    item: object
    rows: int
    request: int  # index of the request in the step


def checked_embedding(item, rows: int, widths: tuple, device: torch.device) -> tuple | None:
    """``(rows tensor, source entry)`` kept on ``item`` by an earlier ``precomputed`` for
    these widths and device, when it has ``rows`` rows; ``None`` otherwise."""
    memo = item._checked_embedding
    if memo is None or memo[0] != widths or memo[1] != device or memo[2].shape[0] != rows:
        return None
    return memo[2:]


def precomputed(w: Wanted, widths: tuple, device: torch.device) -> tuple:
    """A precomputed embedding as checked rows and its source entry (both made once per
    item, widths and device); its row count is checked every time."""
    found = checked_embedding(w.item, w.rows, widths, device)
    if found is not None:
        return found
    item = w.item
    memo = item._checked_embedding
    if memo is not None and memo[0] == widths and memo[1] == device:
        t, entry = memo[2], memo[3]
    else:
        t = precomputed_rows(item.embedding, widths, device, request=w.request, key=item.key)
        entry = source_entry(t, widths[0], anchor_addresses(device))
        object.__setattr__(item, "_checked_embedding", (widths, device, t, entry))
    check_row_count(t, w.rows, request=w.request, key=item.key)
    return t, entry


def resolve(wanted: Sequence[Wanted], *, encoders: Mapping[str, EncoderFn | Encoder] | None,
            cache: EmbeddingCache | None, device: torch.device,
            widths: Sequence[int], stream=None) -> tuple[list[torch.Tensor], list[tuple]]:
    """A source and its source entry for each wanted item, in order; raises before the
    cache changes. ``stream``: the CUDA stream that will read the sources while nothing
    else holds them (the stateless path), on which cache entries read or put are noted
    as used."""
    widths = tuple(widths)
    anchors = anchor_addresses(device)
    sources: list = [None] * len(wanted)
    entries: list = [None] * len(wanted)
    needs: dict[tuple, _Need] = {}  # (modality, key) -> one encode
    hits: dict = {}  # key -> cache entry (used)
    stale: list = []  # keys whose cache entry does not fit their item
    for i, w in enumerate(wanted):
        item = w.item
        if item.embedding is not None:
            sources[i], entries[i] = precomputed(w, widths, device)
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
        logger.debug("encoded %d %s items", len(group), modality)
    kept_parts = [(need, kept(t, device, need, stable), stable)  # may fail: before the cache
                  for need, t, stable in encoded]
    if cache is not None:
        for key in stale:
            cache.discard(key, "its rows, width, dtype or device do not fit the item")
        # uses are noted before puts: an entry read here that a put evicts is not reused
        # by the allocator before the stream's queued work
        for key in hits:
            cache.get(key)
            if stream is not None:
                cache.record_use(key, stream)
        for need, t, stable in kept_parts:
            if not stable and cache.put(need.key, t) and stream is not None:
                cache.record_use(need.key, stream)
    for need, t, _ in kept_parts:
        for i in need.waiting:
            sources[i] = t
    hidden = widths[0]
    for i, t in enumerate(sources):
        if entries[i] is None:
            entries[i] = source_entry(t, hidden, anchors)
    return sources, entries
