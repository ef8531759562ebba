"""Giving items a source the first step a window reaches them: precomputed, cached, encoded.

The items a step reaches first are resolved together, in array operations over the
registry's item columns: precomputed embeddings are checked as one batch; the rest are
deduped by (modality, key), looked up in the cache under their encoder's identity (with
the same checks), and the misses sent to their modality's encoder once (``Encoder``
budgets apply), split by the rows the encoder returned and copied into one block per
call. Every count and format is checked before the cache changes. Each source comes
with its source entry (``mmkernels.layout.SOURCE_*``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from mmassembler.cache import EmbeddingCache, encoder_token, entry_key
from mmassembler.embeddings import FLOATS, checked_sources, entries_of
from mmkernels import KIND_OF_DTYPE
from mmassembler.encode import as_encoder, encode_call
from mmassembler.errors import MissingEncoderError, RowCountError
from mmkernels import layout as L

logger = logging.getLogger(__name__)


class Resolved:
    """What a step's resolve found: sources and entries per wanted slot, and the tensors a
    cache lookup or an encoder call produced (kept by the caller until its step has run)."""

    __slots__ = ("sources", "entries", "encoder_calls", "encoded_rows", "hits", "misses")

    def __init__(self, n: int):
        self.sources: list = [None] * n
        self.entries = np.empty((n, L.SOURCE_FIELDS), np.int64)
        self.encoder_calls = self.encoded_rows = self.hits = self.misses = 0


def resolve(reg, slots: np.ndarray, request: np.ndarray, *, encoders: Mapping | None,
            cache: EmbeddingCache | None, device: torch.device, widths: tuple) -> Resolved:
    """A source and its entry for each item slot of ``reg`` in ``slots`` (``request``:
    each slot's request index in the step, for errors); raises before the cache changes."""
    n = len(slots)
    out = Resolved(n)
    if not n:
        return out
    keys = reg.item_key[slots]
    rows = reg.item_rows[slots]
    has = reg.has_emb[slots]

    def naming(idx):
        return lambda i: (int(request[idx[i]]), keys[idx[i]])

    if has.all():
        out.sources, out.entries = checked_sources(reg.item_emb[slots].tolist(), rows, widths, device,
                                                   naming(np.arange(n)), "the precomputed embedding")
        return out
    pre = np.flatnonzero(has)
    if len(pre):
        srcs, ents = checked_sources(reg.item_emb[slots[pre]].tolist(), rows[pre], widths, device,
                                     naming(pre), "the precomputed embedding")
        _place(out, pre, srcs, ents)
    _resolve_encoded(reg, slots, np.flatnonzero(~has), request, keys, rows, naming, out,
                     encoders=encoders, cache=cache, device=device, widths=widths)
    return out


def _place(out: Resolved, idx: np.ndarray, sources: list, entries: np.ndarray) -> None:
    for i, t in zip(idx.tolist(), sources):
        out.sources[i] = t
    out.entries[idx] = entries


def _resolve_encoded(reg, slots, enc, request, keys, rows, naming, out, *, encoders, cache, device, widths):
    """Sources of the items ``enc`` (indices into ``slots``) that carry no embedding."""
    mods = reg.item_modality[slots[enc]].tolist()
    ident = list(zip(mods, keys[enc].tolist()))
    last = dict(zip(ident, range(len(ident))))  # (modality, key) -> its last item: one encode each
    rep = np.array([last[x] for x in ident], np.int64)
    er = rows[enc]
    if (er != er[rep]).any():
        i = int(np.flatnonzero(er != er[rep])[0])
        j = int(rep[i])
        raise RowCountError(f"two items share key {keys[enc[i]]!r} but take {er[i]} rows "
                            f"(request {request[enc[i]]}) and {er[j]} rows (request {request[enc[j]]})",
                            request=int(request[enc[i]]), item_key=keys[enc[i]], expected=int(er[j]),
                            returned=int(er[i]))
    uniq = np.flatnonzero(rep == np.arange(len(rep)))  # one per (modality, key), in enc order
    umods = [mods[i] for i in uniq.tolist()]
    missing = [m for m in dict.fromkeys(umods) if encoders is None or m not in encoders]
    if missing:
        i = umods.index(missing[0])
        k = int(enc[uniq[i]])
        raise MissingEncoderError(f"no embedding and no encoder for modality {missing[0]!r}",
                                  request=int(request[k]), item_key=keys[k])
    encs = {m: as_encoder(encoders[m]) for m in dict.fromkeys(umods)}
    usrc: list = [None] * len(uniq)
    uent = np.empty((len(uniq), L.SOURCE_FIELDS), np.int64)
    todo = np.ones(len(uniq), bool)
    ckeys = hits = stale = None
    if cache is not None:
        tokens = {m: encoder_token(e.fn if e.identity is None else e.identity)
                  for m, e in encs.items() if not e.stable}
        cached = np.array([m in tokens for m in umods], bool)
        ckeys = [entry_key(tokens[m], m, k) if m in tokens else None
                 for m, k in zip(umods, keys[enc[uniq]].tolist())]
        found = cache.lookup(ckeys)
        hit = np.array([f is not None for f in found], bool) & cached
        hits, stale = [], []
        if hit.any():
            hidx = np.flatnonzero(hit)
            fits, ents = _fitting([found[i] for i in hidx.tolist()], er[uniq[hidx]], widths, device)
            for j, i in enumerate(hidx.tolist()):
                if fits[j]:
                    usrc[i], todo[i] = found[i], False
                    hits.append(ckeys[i])
                else:
                    stale.append(ckeys[i])
            uent[hidx[fits]] = ents[fits]
    put_keys, put_vals, blocks = [], [], []
    for m in encs:  # one call per modality (more where the encoder's budgets say)
        idx = np.flatnonzero(todo & np.array([x == m for x in umods], bool))
        if not len(idx):
            continue
        enc_m = encs[m]
        items = enc[uniq[idx]]
        objs = reg.item_obj[slots[items]].tolist()
        need = er[uniq[idx]]
        for call in enc_m.calls(need.tolist()):
            sub = idx[call]
            srcs, ents, blks = encode_call(enc_m, objs[call], need[call], m, widths, device,
                                           naming(items[call]))
            for i, t in zip(sub.tolist(), srcs):
                usrc[i] = t
            uent[sub] = ents
            out.encoder_calls += 1
            out.encoded_rows += int(need[call].sum())
            if cache is not None and not enc_m.stable:
                put_keys.extend(ckeys[i] for i in sub.tolist())
                put_vals.extend(srcs)
                blocks.append((len(put_keys), blks))
        logger.debug("encoded %d %s items", len(idx), m)
    out.misses = int(todo.sum())
    if cache is not None:
        _commit(cache, hits, out.misses, stale, put_keys, put_vals, blocks)
        out.hits = len(hits)
    # each item takes its representative's source
    at = np.searchsorted(uniq, rep)
    _place(out, enc, [usrc[i] for i in at.tolist()], uent[at])


def _fitting(found: list, rows: np.ndarray, widths: tuple, device: torch.device):
    """Which cache entries fit their items exactly as they are (2-D float rows of a known
    width and the right count on ``device``, unit column stride, element-aligned), and
    their source entries."""
    fits = np.array([isinstance(t, torch.Tensor) and t.ndim == 2 and t.dtype in FLOATS
                     and t.device == device and t.shape[1] in widths and t.shape[0] == r
                     and (t.shape[1] == 1 or t.stride(1) == 1) and not t.requires_grad
                     for t, r in zip(found, rows.tolist())], bool)
    ents = np.zeros((len(found), L.SOURCE_FIELDS), np.int64)
    idx = np.flatnonzero(fits)
    if len(idx):
        ts = [found[i] for i in idx.tolist()]
        kinds = [KIND_OF_DTYPE[t.dtype] for t in ts]
        ptrs = np.array([t.data_ptr() for t in ts], np.int64)
        aligned = ptrs % np.where(np.array(kinds) == L.KIND_F32, 4, 2) == 0
        fits[idx[~aligned]] = False
        ents[idx] = entries_of(ptrs, [t.stride(0) for t in ts], kinds, [t.shape[1] for t in ts],
                               widths[0], device)
    return fits, ents


def _commit(cache, hits, misses, stale, keys, values, blocks) -> None:
    """Settle the step with the cache: hits, misses, stale entries, and each call's block."""
    start = 0
    first = True
    for end, blks in blocks or [(0, [])]:
        block = blks[0] if len(blks) == 1 else None
        cache.commit(hits if first else [], misses if first else 0, stale if first else [],
                     keys[start:end], values[start:end], block)
        first, start = False, end
