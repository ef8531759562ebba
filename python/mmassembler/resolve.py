"""Giving items a source the first step a window reaches them: precomputed, cached, encoded.

The items a step reaches first are resolved together, in plain Python over their
requests' records (a few operations and two tensor calls an item): precomputed
embeddings are checked as one batch; the rest are deduped by (modality, key)
(``_dedupe``), looked up in the cache under their encoder's identity with the same
checks (``_cache_hits``), and the misses sent to their modality's encoder once
(``_encode_misses``; ``Encoder`` budgets apply), split by the rows the encoder returned
and copied into one block per call; each item then takes its representative's source
(``_fan_out``). Every count and format is checked before the cache changes. A source is
``(tensor, first row, source entry, version)``: the entry (``mmkernels.layout.SOURCE_*``)
addresses the item's first row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from mmassembler.cache import BLOCK_ROWS, EmbeddingCache, encoder_token
from mmassembler.embeddings import FLOATS, block_entries, checked_sources, entries_of
from mmassembler.encode import as_encoder, encode_call
from mmassembler.errors import MissingEncoderError, RowCountError
from mmkernels import KIND_OF_DTYPE

logger = logging.getLogger(__name__)


class Resolved:
    """What a step's resolve found: a source per wanted item, and what it cost."""

    __slots__ = ("sources", "encoder_calls", "encoded_rows", "hits", "misses")

    def __init__(self, sources: list):
        self.sources = sources  # (tensor, first row, source entry, version) per item
        self.encoder_calls = self.encoded_rows = self.hits = self.misses = 0


def resolve(reqs: list, keys: list, mods: list, rows: list, embs: list, objs: list, *,
            encoders: Mapping | None, cache: EmbeddingCache | None, device: torch.device,
            widths: tuple) -> Resolved:
    """A source for each wanted item (parallel lists: its request's index in the step, for
    errors; key, modality, rows, precomputed embedding or ``None``, what its encoder is
    handed); raises a typed error before the cache changes."""
    n = len(keys)

    def naming(idx):
        return lambda i: (reqs[idx[i]], keys[idx[i]])

    plain = [e is not None for e in embs]  # ``is``: ``None in`` would call Tensor.__eq__ per entry
    if False not in plain:
        views, ents = checked_sources(embs, rows, widths, device, naming(range(n)), "the precomputed embedding")
        return Resolved([(t, 0, e, -1) for t, e in zip(views, ents)])
    out: list = [None] * n
    if True in plain:
        pre = [i for i in range(n) if plain[i]]
        views, ents = checked_sources([embs[i] for i in pre], [rows[i] for i in pre], widths, device,
                                      naming(pre), "the precomputed embedding")
        for i, t, e in zip(pre, views, ents):
            out[i] = (t, 0, e, -1)
        enc = [i for i in range(n) if not plain[i]]
    else:
        enc = range(n)
    found = Resolved(out)
    _resolve_encoded(found, enc, reqs, keys, mods, rows, objs, naming(enc), encoders=encoders, cache=cache,
                     device=device, widths=widths)
    return found


def _resolve_encoded(found: Resolved, enc: list, reqs, keys, mods, rows, objs, naming, *, encoders, cache,
                     device, widths) -> None:
    """Sources of the items ``enc`` (indices into the wanted lists) that carry no embedding."""
    if type(enc) is range:  # every wanted item is encoded
        ekeys, emods, erows, ereqs = keys, mods, rows, reqs
    else:
        ekeys, emods, erows, ereqs = ([keys[i] for i in enc], [mods[i] for i in enc], [rows[i] for i in enc],
                                      [reqs[i] for i in enc])
    rep, uniq = _dedupe(ekeys, emods, erows, ereqs)
    umods = emods if rep is None else [emods[i] for i in uniq]
    kinds = list(dict.fromkeys(umods))
    missing = [m for m in kinds if encoders is None or m not in encoders]
    if missing:
        i = umods.index(missing[0])
        i = i if uniq is None else uniq[i]
        raise MissingEncoderError(f"no embedding and no encoder for modality {missing[0]!r}",
                                  request=reqs[enc[i]], item_key=ekeys[i])
    encs = {m: as_encoder(encoders[m]) for m in kinds}
    if rep is None:  # every key once: the items are their own representatives
        uneed, ukeys, uobjs = erows, ekeys, objs if type(enc) is range else [objs[i] for i in enc]
        uname = naming
    else:
        uneed, ukeys, uobjs = [erows[i] for i in uniq], [ekeys[i] for i in uniq], [objs[enc[i]] for i in uniq]
        uname = lambda i: naming(uniq[i])  # noqa: E731
    usrc: list = [None] * len(uneed)
    ckeys = hits = stale = None
    if cache is not None:
        ckeys, hits, stale = _cache_hits(cache, encs, umods, ukeys, uneed, usrc, widths, device)
    puts = _encode_misses(found, encs, kinds, umods, uneed, usrc, uobjs, ckeys, uname, cache is not None, widths,
                          device)
    found.misses = len(usrc) - (len(hits) if hits else 0)
    if cache is not None:
        cache.commit(list(hits), found.misses, stale, puts)
        found.hits = len(hits)
    if rep is None and type(enc) is range:
        found.sources = usrc
    else:
        _fan_out(found.sources, enc, rep, uniq, usrc)


def _dedupe(keys: list, mods: list, rows: list, reqs: list) -> tuple[list, list]:
    """Each item's representative (the last item of its (modality, key)) and the
    representatives in order (``(None, None)`` when every key comes once); two items of one
    key that take different rows is a ``RowCountError``."""
    ident = list(zip(mods, keys))
    last = dict(zip(ident, range(len(ident))))  # (modality, key) -> its last item: one encode each
    if len(last) == len(ident):
        return None, None
    rep = [last[x] for x in ident]
    for i, j in enumerate(rep):
        if rows[i] != rows[j]:
            raise RowCountError(f"two items share key {keys[i]!r} but take {rows[i]} rows (request {reqs[i]}) "
                                f"and {rows[j]} rows (request {reqs[j]})", request=reqs[i], item_key=keys[i],
                                expected=rows[j], returned=rows[i])
    return rep, [i for i, j in enumerate(rep) if i == j]


def _cache_hits(cache: EmbeddingCache, encs: dict, umods: list, ukeys: list, uneed: list, usrc: list,
                widths: tuple, device) -> tuple[list, dict, list]:
    """Look the representatives up under their encoder's identity; fill ``usrc`` for the
    entries that fit their item as they are. Returns the cache keys (``None`` for a stable
    encoder's items, never cached), the hits (keys, as a dict) and stale keys."""
    tokens = {m: encoder_token(e.fn if e.identity is None else e.identity)
              for m, e in encs.items() if not e.stable}
    ckeys = [(tokens[m], m, k) if m in tokens else None for m, k in zip(umods, ukeys)]
    entries = cache.lookup(ckeys)
    hits: dict = {}
    stale = []
    present = [e is not None for e in entries]  # never ``None in``: that calls Tensor.__eq__
    if True in present:
        idx = [i for i, p in enumerate(present) if p]
        fits = _fitting([entries[i] for i in idx], [uneed[i] for i in idx], widths, device)
        for i, src in zip(idx, fits):
            if src is None:
                stale.append(ckeys[i])
            else:
                usrc[i] = src
                hits[ckeys[i]] = None
    return ckeys, hits, stale


def _encode_misses(found: Resolved, encs: dict, kinds: list, umods: list, uneed: list, usrc: list, uobjs: list,
                   ckeys: list | None, naming, caching: bool, widths: tuple, device) -> list:
    """Send the representatives without a source to their modality's encoder (one call
    per modality, more where its budgets say); fill ``usrc``. Returns what to put in the
    cache: per block ``(keys, block, starts, rows)``."""
    puts = []
    for m in kinds:
        idx = [i for i, (mm, s) in enumerate(zip(umods, usrc)) if mm == m and s is None]
        if not idx:
            continue
        enc = encs[m]
        objs, need = [uobjs[i] for i in idx], [uneed[i] for i in idx]
        for call in enc.calls(need):
            sub = idx[call]
            srcs, row0, ents, blocks = encode_call(enc, objs[call], need[call], m, widths, device,
                                                   lambda i, sub=sub: naming(sub[i]))
            versions = [t._version for t in srcs] if enc.stable else [-1] * len(srcs)
            for i, t, r, e, v in zip(sub, srcs, row0, ents, versions):
                usrc[i] = (t, r, e, v)
            found.encoder_calls += 1
            found.encoded_rows += sum(need[call])
            if caching and not enc.stable:
                for block in blocks:
                    mine = [k for k, t in enumerate(srcs) if t is block]
                    puts.append(([ckeys[sub[k]] for k in mine], block, [row0[k] for k in mine],
                                 [need[call][k] for k in mine]))
        logger.debug("encoded %d %s items", len(idx), m)
    return puts


def _fan_out(out: list, enc: list, rep: list, uniq: list, usrc: list) -> None:
    """Each encoded item takes its representative's source."""
    if rep is None:
        for i, s in zip(enc, usrc):
            out[i] = s
        return
    at = {u: k for k, u in enumerate(uniq)}
    for i, r in zip(enc, rep):
        out[i] = usrc[at[r]]


def _fitting(found: list, rows: list, widths: tuple, device: torch.device) -> list:
    """Per cache entry, its source ``(tensor, first row, entry, -1)`` when it fits its item
    exactly as it is (2-D float rows of a known width and the right count on ``device``,
    unit column stride, element-aligned), else ``None``. Entries that are rows of a block
    (``(block, start, rows, ident)`` tuples, what the assembler puts) are checked once per
    block."""
    out: list = [None] * len(found)
    blocks: dict = {}
    for i, (f, r) in enumerate(zip(found, rows)):
        if type(f) is BLOCK_ROWS:
            if f[2] == r:
                blocks.setdefault(f[3], (f[0], []))[1].append((i, f[1]))
        elif _fits_as_is(f, r, widths, device):
            e = entries_of([f.data_ptr()], [f.stride(0)], [KIND_OF_DTYPE[f.dtype]], [f.shape[1]], widths[0],
                           device)[0]
            out[i] = (f, 0, e, -1)
    for block, members in blocks.values():
        if _fits_as_is(block, block.shape[0], widths, device):
            starts = [s for _, s in members]
            for (i, s), e in zip(members, block_entries(block, starts, widths[0])):
                out[i] = (block, s, e, -1)
    return out


def _fits_as_is(t, rows: int, widths: tuple, device: torch.device) -> bool:
    return (isinstance(t, torch.Tensor) and t.ndim == 2 and t.dtype in FLOATS and t.device == device
            and t.shape[1] in widths and t.shape[0] == rows and (t.shape[1] == 1 or t.stride(1) == 1)
            and t.data_ptr() % t.element_size() == 0)
