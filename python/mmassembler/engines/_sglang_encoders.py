"""SGLang's data-embedding functions as the Assembler's encoders.

A function may return a list (one tensor per item), a ``[items, rows, hidden]`` tensor, or
one concatenated 2-D tensor. A concatenated output is split by ``rows_fn`` (rows from the
item's own metadata, e.g. its image grid), never by placeholder counts; without one, a
function's first call of several items is made on one item alone, and one that answers
with a single tensor is called one item at a time from then on (logged once): no batched
call is made and thrown away. ``rows_fn`` keys that match no modality are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

from mmassembler.identity import ObjectState
from mmassembler.encode import Encoder
from mmassembler.errors import BatchShapeError, EncoderOutputError

logger = logging.getLogger(__name__)

RowsFn = Callable[[object], int]
_concatenating = ObjectState()  # encoder (or bound method's instance) -> functions seen concatenating
_listing = ObjectState()  # ... -> functions seen returning a list (one tensor per item)
_warned = ObjectState()


def _seen(table: ObjectState, func) -> bool:
    """Whether ``func`` (a bound method: its function on its instance) is in ``table``."""
    owner, fn = getattr(func, "__self__", None), getattr(func, "__func__", func)
    if owner is None:
        return table.get(fn, False)
    return fn in table.get(owner, ())


def _mark(table: ObjectState, func) -> None:
    owner, fn = getattr(func, "__self__", None), getattr(func, "__func__", func)
    if owner is None:
        table.set(fn, True)
    else:
        table.set(owner, table.get(owner, frozenset()) | {fn})


def _rows_of(rows_fn: RowsFn, sg_item) -> int:
    """``rows_fn(item)``, which must be an int."""
    n = rows_fn(sg_item)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise EncoderOutputError(f"rows_fn returned {n!r} for an item; expected its row count (an int)",
                                 item_key=getattr(sg_item, "hash", None))
    return int(n)


def _make_encoder(func: Callable, rows_fn: RowsFn | None, name: str, why: str = "") -> Encoder:
    """Wrap an SGLang data-embedding function as an ``assemble`` encoder.

    A list output is used as it is. A single tensor for several items is split by
    ``rows_fn`` when given; otherwise the items are encoded one at a time, so each output
    belongs to one item, and that encoder is called per item from then on.
    """
    def per_item(sg_items):
        if not _seen(_warned, func):
            _mark(_warned, func)
            logger.warning("the %s encoder returns one tensor for several items and %s: encoding one "
                           "item per call (pass rows_fn to batch)", name,
                           why or "no row-count function was given")
        return [func([it]) for it in sg_items]

    def encode(sg_items):
        if rows_fn is None and len(sg_items) > 1:
            if _seen(_concatenating, func):
                return per_item(sg_items)
            if not _seen(_listing, func):  # first call: one item tells what the encoder returns
                first = func(sg_items[:1])
                if isinstance(first, (list, tuple)) or (first.dim() == 3 and first.shape[0] == 1):
                    _mark(_listing, func)  # one tensor per item, or [items, rows, hidden]: batchable
                    rest = func(sg_items[1:])
                    return list(first) + list(rest)
                _mark(_concatenating, func)
                return [first] + per_item(sg_items[1:])
        out = func(sg_items)
        if isinstance(out, (list, tuple)):
            return list(out)
        if len(sg_items) == 1:
            return [out]
        if out.dim() == 3 and out.shape[0] == len(sg_items):  # [items, rows, hidden]: the
            return list(out)                                   # encoder's own per-item split
        _mark(_concatenating, func)
        if rows_fn is not None:
            return out, [_rows_of(rows_fn, it) for it in sg_items]
        return per_item(sg_items)

    return Encoder(encode, identity=func)  # cache entries belong to the engine's function


def modality_name(modality) -> str:
    """``Modality.IMAGE`` (or ``"IMAGE"``) -> ``"image"``."""
    return (getattr(modality, "name", None) or str(modality)).lower()


class StepEncoders(Mapping):
    """The step's encoders by modality name, wrapped on first use: the engine's
    ``data_embedding_func_mapping`` (keys ``Modality`` members), else
    ``multimodal_model.get_<modality>_feature``. Built per step and read only when an item
    needs encoding, so a steady step pays nothing for it."""

    def __init__(self, mapping: Mapping | None, model, rows_fn):
        self._mapping, self._model, self._rows_fn, self._made = mapping, model, rows_fn, {}
        self._by_name: dict | None = None
        if isinstance(rows_fn, Mapping):
            unknown = [k for k in rows_fn if self._func(modality_name(k)) is None]
            if unknown:
                known = sorted(set(self._funcs) | {n[4:-8] for n in dir(model or object())
                                                   if n.startswith("get_") and n.endswith("_feature")})
                raise BatchShapeError(f"rows_fn has keys {unknown!r} that match no modality with an encoder "
                                      f"({known}): its rows function would never be used")

    @property
    def _funcs(self) -> dict:
        if self._by_name is None:
            self._by_name = {modality_name(k): v for k, v in (self._mapping or {}).items()}
        return self._by_name

    def _func(self, modality: str):
        return self._funcs.get(modality) or getattr(self._model, f"get_{modality}_feature", None)

    def __contains__(self, modality) -> bool:
        return self._func(modality) is not None

    def __getitem__(self, modality: str):
        if modality not in self._made:
            func = self._func(modality)
            if func is None:
                raise KeyError(modality)
            fn = (self._rows_by_name().get(modality) if isinstance(self._rows_fn, Mapping)
                  else self._rows_fn)
            why = (f"rows_fn has no entry for {modality!r} (its keys: {list(self._rows_fn)})"
                   if isinstance(self._rows_fn, Mapping) and fn is None else "")
            self._made[modality] = _make_encoder(func, fn, modality, why)
        return self._made[modality]

    def _rows_by_name(self) -> dict:
        """``rows_fn`` keyed as the encoders are: ``Modality`` members or names, any case."""
        return {modality_name(k): v for k, v in self._rows_fn.items()}

    def __iter__(self):
        return iter(self._funcs)

    def __len__(self) -> int:
        return len(self._funcs)
