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

from mmassembler.cache import BlockRows, EmbeddingCache, encoder_token
from mmassembler.embeddings import FLOATS, block_entries, checked_sources, entries_of
from mmkernels import KIND_OF_DTYPE
from mmassembler.encode import as_encoder, encode_call
from mmassembler.errors import MissingEncoderError, RowCountError
from mmkernels import layout as L

logger = logging.getLogger(__name__)


class Resolved:
    """What a step's resolve found: sources and entries per wanted slot, and the tensors a
    cache lookup or an encoder call produced (kept by the caller until its step has run)."""

    __slots__ = ("sources", "first_rows", "entries", "versions", "encoder_calls", "encoded_rows", "hits",
                 "misses")

    def __init__(self, n: int):
        self.sources: list = [None] * n  # what holds each item's rows (its own tensor, or a block)
        self.first_rows = np.zeros(n, np.int64)  # where they start in it
        self.entries = np.empty((n, L.SOURCE_FIELDS), np.int64)
        self.versions = np.full(n, -1, np.int64)  # a stable source's version counter when read (else -1)
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

    if False not in has:
        out.sources, out.entries = checked_sources(reg.item_emb[slots].tolist(), rows, widths, device,
                                                   naming(np.arange(n)), "the precomputed embedding")
        return out
    pre = has.nonzero()[0]
    if len(pre):
        srcs, ents = checked_sources(reg.item_emb[slots[pre]].tolist(), rows[pre], widths, device,
                                     naming(pre), "the precomputed embedding")
        _place(out, pre, srcs, 0, ents)
    _resolve_encoded(reg, slots, (~has).nonzero()[0], request, keys, rows, naming, out,
                     encoders=encoders, cache=cache, device=device, widths=widths)
    return out


def _place(out: Resolved, idx: np.ndarray, sources: list, first_rows, entries: np.ndarray) -> None:
    if len(idx) == len(out.sources):
        out.sources = list(sources)
    else:
        for i, t in zip(idx.tolist(), sources):
            out.sources[i] = t
    out.first_rows[idx] = first_rows
    out.entries[idx] = entries


def _resolve_encoded(reg, slots, enc, request, keys, rows, naming, out, *, encoders, cache, device, widths):
    """Sources of the items ``enc`` (indices into ``slots``) that carry no embedding."""
    mods = reg.item_modality[slots[enc]].tolist()
    ident = list(zip(mods, keys[enc].tolist()))
    last = dict(zip(ident, range(len(ident))))  # (modality, key) -> its last item: one encode each
    rep = np.array([last[x] for x in ident], np.int64)
    er = rows[enc]
    if True in (er != er[rep]):
        i = int((er != er[rep]).nonzero()[0][0])
        j = int(rep[i])
        raise RowCountError(f"two items share key {keys[enc[i]]!r} but take {er[i]} rows "
                            f"(request {request[enc[i]]}) and {er[j]} rows (request {request[enc[j]]})",
                            request=int(request[enc[i]]), item_key=keys[enc[i]], expected=int(er[j]),
                            returned=int(er[i]))
    uniq = (rep == np.arange(len(rep))).nonzero()[0]  # one per (modality, key), in enc order
    u = len(uniq)
    umods = [mods[i] for i in uniq.tolist()]
    kinds = list(dict.fromkeys(umods))
    missing = [m for m in kinds if encoders is None or m not in encoders]
    if missing:
        i = umods.index(missing[0])
        k = int(enc[uniq[i]])
        raise MissingEncoderError(f"no embedding and no encoder for modality {missing[0]!r}",
                                  request=int(request[k]), item_key=keys[k])
    encs = {m: as_encoder(encoders[m]) for m in kinds}
    usrc: list = [None] * u
    urow0 = np.zeros(u, np.int64)
    uver = np.full(u, -1, np.int64)
    uent = np.empty((u, L.SOURCE_FIELDS), np.int64)
    uneed = er[uniq]
    todo = np.ones(u, bool)
    hits, stale, ckeys = [], [], None
    if cache is not None:
        tokens = {m: encoder_token(e.fn if e.identity is None else e.identity)
                  for m, e in encs.items() if not e.stable}
        ukeys = keys[enc[uniq]].tolist()
        ckeys = ([(tokens[umods[0]], umods[0], k) for k in ukeys] if len(kinds) == 1 and kinds[0] in tokens
                 else [(tokens[m], m, k) if m in tokens else None for m, k in zip(umods, ukeys)])
        found = cache.lookup(ckeys)
        present = [f is not None for f in found]  # never ``None in``: that calls Tensor.__eq__
        if True in present:
            hidx = np.array([i for i, f in enumerate(present) if f], np.int64)
            fits, srcs, row0, ents = _fitting([found[i] for i in hidx.tolist()], uneed[hidx], widths, device)
            for j, i in enumerate(hidx.tolist()):
                if fits[j]:
                    usrc[i], todo[i] = srcs[j], False
                    hits.append(ckeys[i])
                else:
                    stale.append(ckeys[i])
            urow0[hidx[fits]] = row0[fits]
            uent[hidx[fits]] = ents[fits]
    puts = []
    umods_arr = np.array(umods, dtype=object) if len(kinds) > 1 else None
    for m in kinds:  # one call per modality (more where the encoder's budgets say)
        idx = (todo if umods_arr is None else todo & (umods_arr == m)).nonzero()[0]
        if not len(idx):
            continue
        enc_m = encs[m]
        items = enc[uniq[idx]]
        objs = reg.item_obj[slots[items]].tolist()
        need = uneed[idx]
        for call in enc_m.calls(need.tolist()):
            sub = idx[call]
            srcs, row0, ents, blocks = encode_call(enc_m, objs[call], need[call], m, widths, device,
                                                   naming(items[call]))
            for i, t in zip(sub.tolist(), srcs):
                usrc[i] = t
            urow0[sub], uent[sub] = row0, ents
            if enc_m.stable:  # read in place: its version now, for the check_stable debug option
                uver[sub] = [t._version for t in srcs]
            out.encoder_calls += 1
            out.encoded_rows += int(need[call].sum())
            if cache is not None and not enc_m.stable:
                for block in blocks:
                    mine = np.array([s is block for s in srcs], bool) if len(blocks) > 1 else slice(None)
                    puts.append(([ckeys[i] for i in sub[mine].tolist()], block, row0[mine], need[call][mine]))
        logger.debug("encoded %d %s items", len(idx), m)
    out.misses = int(np.add.reduce(todo))
    if cache is not None:
        cache.commit(hits, out.misses, stale, puts)
        out.hits = len(hits)
    # each item takes its representative's source
    if u == len(enc):
        _place(out, enc, usrc, urow0, uent)
        out.versions[enc] = uver
    else:
        at = np.searchsorted(uniq, rep)
        _place(out, enc, [usrc[i] for i in at.tolist()], urow0[at], uent[at])
        out.versions[enc] = uver[at]


def _fitting(found: list, rows: np.ndarray, widths: tuple, device: torch.device):
    """Which cache entries fit their items exactly as they are (2-D float rows of a known
    width and the right count on ``device``, unit column stride, element-aligned), and for
    those their sources, first rows and source entries. Entries that are rows of a block
    (``BlockRows``, what the assembler puts) are checked once per block, in array
    operations; other tensors one by one."""
    n = len(found)
    fits = np.zeros(n, bool)
    srcs: list = [None] * n
    row0 = np.zeros(n, np.int64)
    ents = np.zeros((n, L.SOURCE_FIELDS), np.int64)
    kinds = [type(f) is BlockRows for f in found]
    idx = np.array([i for i, b in enumerate(kinds) if b], np.int64)
    if len(idx):
        recs = [found[i] for i in idx.tolist()]
        blocks = {r.ident: r.block for r in recs}
        good = {k: _fits_as_is(b, b.shape[0], widths, device) for k, b in blocks.items()}
        ok = np.array([good[r.ident] for r in recs], bool) & (np.array([r.rows for r in recs]) == rows[idx])
        starts = np.array([r.start for r in recs], np.int64)
        which = [r.ident for r in recs]
        for k, block in blocks.items():
            if good[k]:
                sel = np.array([w == k for w in which], bool) & ok
                ents[idx[sel]] = block_entries(block, starts[sel], widths[0])
        fits[idx] = ok
        row0[idx] = starts
        for i, r in zip(idx.tolist(), recs):
            srcs[i] = r.block
    if len(idx) < n:
        for i, f in enumerate(found):
            if not kinds[i] and _fits_as_is(f, rows[i], widths, device):
                fits[i], srcs[i] = True, f
                ents[i] = entries_of([f.data_ptr()], [f.stride(0)], [KIND_OF_DTYPE[f.dtype]], [f.shape[1]],
                                     widths[0], device)[0]
    return fits, srcs, row0, ents


def _fits_as_is(t, rows: int, widths: tuple, device: torch.device) -> bool:
    return (isinstance(t, torch.Tensor) and t.ndim == 2 and t.dtype in FLOATS and t.device == device
            and t.shape[1] in widths and t.shape[0] == rows and (t.shape[1] == 1 or t.stride(1) == 1)
            and t.data_ptr() % t.element_size() == 0)
