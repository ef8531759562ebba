"""Encoder batching: one call per modality for the whole batch, split by what it returned.

The items of a batch that overlap their chunk and have neither a precomputed embedding
nor a cache entry are deduped by key and passed to their modality's encoder together
(optionally in budgeted micro-batches). The output is split by the rows the encoder
actually returned -- never by placeholder counts -- and every count is checked against
the rows the item's placeholders take before anything is cached or written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mmassembler.batch import Item
from mmassembler.cache import EmbeddingCache
from mmassembler.embeddings import as_rows, check_row_count, fits, kept, precomputed_rows
from mmassembler.errors import (BatchShapeError, EncoderOutputError,
                                MissingEncoderError, RowCountError)
from mmassembler.planner import IndexedGroup, Plan, PlannedItem
from mmkernels.ops import source_info

logger = logging.getLogger(__name__)

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
    waiting: list[int] = field(default_factory=list)  # indices into plan.items
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


def _precomputed(p, widths: Sequence[int], device: torch.device) -> tuple[torch.Tensor, tuple]:
    """A planned item's precomputed embedding as checked rows and its kernel source info.

    Checked once per item and (widths, device); the row count is checked every time.
    """
    item, rows = p.item, p.layout.num_rows
    memo = item._checked_embedding
    if memo is not None and memo[0] == widths and memo[1] == device:
        t, info = memo[2], memo[3]
    else:
        t = precomputed_rows(item.embedding, widths, device, request=p.request, key=item.key)
        info = source_info(t)
        object.__setattr__(item, "_checked_embedding", (widths, device, t, info))
    check_row_count(t, rows, request=p.request, key=item.key)
    return t, info


def _bulk(group: IndexedGroup, request: int, widths, device):
    """Sources and info of a whole indexed request whose items are all precomputed.

    Built once per request index and (widths, device), so a chunk of such a request
    costs two list/array slices; ``None`` when some item needs the cache or an encoder.
    """
    idx = group.index
    bulk = idx.bulk
    if bulk is None or bulk[0] != widths or bulk[1] != device:
        if not all(it.embedding is not None for it in idx.items):
            bulk = (widths, device, None, None)
        else:
            pairs = [_precomputed(PlannedItem(request, it, lay), widths, device)
                     for it, lay in zip(idx.items, idx.layouts)]
            bulk = (widths, device, [t for t, _ in pairs],
                    np.array([i for _, i in pairs], dtype=np.int64).reshape(len(pairs), 5))
        idx.bulk = bulk
    if bulk[2] is None:
        return None
    j0, j1 = group.j0, group.j0 + group.count
    return bulk[2][j0:j1], bulk[3][j0:j1]


def resolve_sources(
    plan: Plan,
    *,
    encoders: Mapping[str, EncoderFn | Encoder] | None,
    cache: EmbeddingCache | None,
    device: torch.device,
    dtype: torch.dtype,
    widths: Sequence[int],
    stream=None,
) -> tuple[list[torch.Tensor], np.ndarray]:
    """One source tensor per planned item, encoding what is neither given nor cached.

    Returns the sources and their ``[n, 5]`` kernel source info (``mmkernels.ops.
    source_info``). ``stream`` is the CUDA stream the launch will use (``None`` on CPU).
    Raises before any change to the cache when anything is off.
    """
    widths = tuple(widths)
    n = len(plan.items)
    sources: list[torch.Tensor | None] = [None] * n
    infos: list[tuple | None] = [None] * n
    bulk_info: list[tuple[int, np.ndarray]] = []
    covered = bytearray(n)
    for g in plan.groups:
        found = _bulk(g, plan.items[g.first].request, widths, device)
        if found is not None:
            sources[g.first:g.first + g.count] = found[0]
            bulk_info.append((g.first, found[1]))
            covered[g.first:g.first + g.count] = b"\x01" * g.count
    pending: dict[str, dict[int, _Need]] = {}
    lookups: list[tuple[int, int]] = []
    rows_of_key: dict = {}  # key -> (rows, request): one key, one row count, in any order
    for i, p in enumerate(plan.items):
        if covered[i]:
            continue
        item, rows = p.item, p.layout.num_rows
        if item.embedding is not None:
            sources[i], infos[i] = _precomputed(p, widths, device)
            continue
        first = rows_of_key.setdefault((item.modality, item.key), (rows, p.request))
        if first[0] != rows:
            raise RowCountError(f"two items share key {item.key} but take {first[0]} rows "
                                f"(request {first[1]}) and {rows} rows (request {p.request})",
                                request=p.request, item_key=item.key, expected=first[0], returned=rows)
        by_key = pending.setdefault(item.modality, {})
        need = by_key.get(item.key)
        if need is None and cache is not None:
            # peek: the cache's recency, counters and collision drops wait for the checks
            lookups.append((item.key, rows))
            hit = cache.peek(item.key)
            if hit is not None and fits(hit, rows, widths, device):
                sources[i] = hit
                continue
        if need is None:
            need = by_key[item.key] = _Need(item.key, item, rows)
        elif need.rows != rows:
            raise RowCountError(f"two items share key {item.key} but take {need.rows} rows "
                                f"(request {need.requests[0]}) and {rows} rows (request "
                                f"{p.request})", request=p.request, item_key=item.key,
                                expected=need.rows, returned=rows)
        need.waiting.append(i)
        need.requests.append(p.request)

    pending = {m: needs for m, needs in pending.items() if needs}
    for modality, needs in pending.items():
        if encoders is None or modality not in encoders:
            need = next(iter(needs.values()))
            raise MissingEncoderError(f"no embedding, no cache entry and no encoder for modality "
                                      f"{modality!r}", request=need.requests[0], item_key=need.key)

    encoded: list[tuple[_Need, torch.Tensor, bool]] = []
    for modality, needs in pending.items():
        enc = encoders[modality]
        if not isinstance(enc, Encoder):
            enc = Encoder(enc)
        for call in enc.batches(list(needs.values())):
            result = enc.fn([n.item for n in call])
            encoded.extend((need, t, enc.stable) for need, t in zip(call, _split(result, call, modality, widths)))
        logger.debug("encoded %d %s items", len(needs), modality)

    encoded = [(need, kept(t, device, need, stable), stable)  # may fail: before the cache
               for need, t, stable in encoded]
    # Every count is checked: now the cache may change. Lookups count, refresh recency and
    # drop collided entries; uses are recorded before puts so an entry this batch reads
    # and a put evicts is not reused by the allocator before the launch's stream gets there.
    if cache is not None:
        for key, rows in lookups:
            if cache.get(key, rows=rows) is not None and stream is not None:
                cache.record_use(key, stream)
    for need, t, stable in encoded:
        for i in need.waiting:
            sources[i] = t
        if cache is not None and not stable and cache.put(need.key, t) and stream is not None:
            cache.record_use(need.key, stream)

    info = np.empty((n, 5), dtype=np.int64)
    for first, block in bulk_info:
        info[first:first + len(block)] = block
    n_bulk = sum(len(block) for _, block in bulk_info)
    rest = range(n) if not n_bulk else [i for i in range(n) if not covered[i]] if n_bulk < n else []
    if len(rest):
        info[rest] = [infos[i] if infos[i] is not None else source_info(sources[i]) for i in rest]
    return sources, info
