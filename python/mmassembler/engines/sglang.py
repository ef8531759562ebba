"""SGLang's ``embed_mm_inputs`` shape, backed by one ``assemble`` call.

Reads objects with ``.mm_items``; items with ``.modality`` (an enum with ``.name``),
``.hash``, ``.offsets`` (inclusive spans), ``.precomputed_embeddings`` and ``.feature``.
Encoders are ``data_embedding_func_mapping[modality]`` or
``multimodal_model.get_<modality>_feature``; they may return a list (one tensor per item)
a ``[items, rows, hidden]`` tensor, or one concatenated 2-D tensor. A concatenated output
is split by ``rows_fn`` (rows from the item's own metadata, e.g. its image grid), never by
placeholder counts; without one, such an encoder is called one item at a time (logged once).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from mmassembler.batch import Item
from mmassembler.cache import EmbeddingCache
from mmassembler.engines._embedding import plain_table, text_rows
from mmassembler.engines._resident import resident_for
from mmassembler.engines._state import ObjectState
from mmassembler.errors import BatchShapeError, EncoderOutputError

logger = logging.getLogger(__name__)

RowsFn = Callable[[object], int]
_items = ObjectState()  # SGLang item -> our Item
_concatenating = ObjectState()  # encoder (or bound method's instance) -> functions seen concatenating
_warned = ObjectState()
_moved = ObjectState()  # SGLang item -> (its offloaded embedding, the copy on the ids' device)
DEFAULT_CACHE_BYTES = 1 << 30
_default_cache: EmbeddingCache | None = None


def default_cache() -> EmbeddingCache:
    """The adapter-wide cache ``embed_mm_inputs`` uses unless given one (1 GiB; the
    ``MMASSEMBLER_CACHE_BYTES`` environment variable sets another size)."""
    global _default_cache
    if _default_cache is None:
        _default_cache = EmbeddingCache(int(os.environ.get("MMASSEMBLER_CACHE_BYTES", DEFAULT_CACHE_BYTES)))
    return _default_cache


def _modality_name(modality) -> str:
    return (getattr(modality, "name", None) or str(modality)).lower()


def _item_for(sg_item, device: torch.device) -> Item:
    """Our ``Item`` for an SGLang item, made once and kept beside it (never on it)."""
    cached = _items.get(sg_item)
    emb = getattr(sg_item, "precomputed_embeddings", None)
    if isinstance(emb, torch.Tensor) and emb.device != device:  # offloaded between chunks
        moved = _moved.get(sg_item)
        if moved is None or moved[0] is not emb:
            moved = _moved.set(sg_item, (emb, emb.to(device)))
        emb = moved[1]
    spans = [tuple(map(int, o)) for o in sg_item.offsets]
    if (cached is not None and cached.key == sg_item.hash and cached.embedding is emb
            and list(cached.spans) == spans):
        return cached
    item = Item(sg_item.hash, spans, modality=_modality_name(sg_item.modality), embedding=emb,
                data=sg_item)
    return _items.set(sg_item, item)


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


def _make_encoder(func: Callable, rows_fn: RowsFn | None, name: str) -> Callable:
    """Wrap an SGLang data-embedding function as an ``assemble`` encoder.

    A list output is used as it is. A single tensor for several items is split by
    ``rows_fn`` when given; otherwise the items are encoded one at a time, so each output
    belongs to one item, and that encoder is called per item from then on.
    """
    def per_item(sg_items):
        if not _seen(_warned, func):
            _mark(_warned, func)
            logger.warning("the %s encoder returns one tensor for several items and no row-count "
                           "function was given: encoding one item per call (pass rows_fn to batch)",
                           name)
        return [func([it]) for it in sg_items]

    def encode(items):
        sg_items = [it.data for it in items]
        if rows_fn is None and len(sg_items) > 1 and _seen(_concatenating, func):
            return per_item(sg_items)
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

    return encode


def embed_mm_inputs(
    mm_inputs_list: Sequence,
    extend_prefix_lens: Sequence[int],
    extend_seq_lens: Sequence[int],
    input_ids: torch.Tensor,
    input_embedding,
    multimodal_model=None,
    data_embedding_func_mapping: Mapping | None = None,
    placeholder_tokens=None,
    use_deepstack: Mapping | None = None,
    *,
    cache: EmbeddingCache | None | str = "default",
    rows_fn: RowsFn | Mapping[str, RowsFn] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict] | None:
    """``(input_embeds, other_info)`` for an SGLang extend batch, in one launch.

    ``input_embedding`` that is exactly ``nn.Embedding`` is looked up in the same pass
    (fused mode); any other module (Gemma3's scaled embedding, a tensor-parallel
    vocabulary) is called on the clamped ids and the multimodal rows are written over its
    output. With ``use_deepstack`` (a non-empty mapping, as the engine reads it),
    ``other_info["input_deepstack_embeds"]`` is ``[tokens, k * hidden]``, zero on text rows.
    ``cache``: ``"default"`` is one adapter-wide ``EmbeddingCache`` (``default_cache()``),
    so items cut by chunks are encoded once, as the engine's own cache does; ``None``
    disables it. A precomputed embedding on another device (SGLang offloads them between
    chunks) is moved to the ids' device once. ``placeholder_tokens`` is accepted for
    signature compatibility: placement is by offsets. ``mm_inputs_list=None`` returns
    ``None``, as the engine does.
    """
    if mm_inputs_list is None:
        return None
    if isinstance(cache, str):
        if cache != "default":
            raise BatchShapeError(f"cache must be an EmbeddingCache, None or 'default', got {cache!r}")
        cache = default_cache()
    if not len(mm_inputs_list) == len(extend_prefix_lens) == len(extend_seq_lens):
        raise BatchShapeError(
            f"mm_inputs_list, extend_prefix_lens and extend_seq_lens have {len(mm_inputs_list)}, "
            f"{len(extend_prefix_lens)} and {len(extend_seq_lens)} entries; they must describe the same "
            f"requests (for a batch that mixes text-only requests use prepare_mm_inputs, or pass None "
            f"for each text-only request)")
    funcs = {_modality_name(k): v for k, v in (data_embedding_func_mapping or {}).items()}
    encoders = _Encoders(funcs, multimodal_model, rows_fn)
    device = input_ids.device
    weight = plain_table(input_embedding)  # else the engine's module computes text rows
    embeds = None if weight is not None else text_rows(input_embedding, input_ids)
    ref = weight if weight is not None else embeds
    deepstack_out = None
    if use_deepstack:  # the engine returns the buffer whenever the mapping is given
        k = len(getattr(multimodal_model, "deepstack_visual_indexes", ()))
        deepstack_out = torch.zeros((input_ids.shape[0], k * ref.shape[1]), dtype=ref.dtype,
                                    device=device)
    ds_cols = 0 if deepstack_out is None else deepstack_out.shape[1]
    resident = resident_for(input_embedding, weight, ref, ds_cols, backend)
    owners = [m if m is not None and getattr(m, "mm_items", None) else None for m in mm_inputs_list]
    embeds = resident.step(owners, _snapshot, lambda m: _register(m, device), extend_prefix_lens,
                           extend_seq_lens, input_ids, encoders=encoders, cache=cache,
                           out=embeds, deepstack_out=deepstack_out)
    other = {"input_deepstack_embeds": deepstack_out} if deepstack_out is not None else {}
    return embeds, other


def _snapshot(mm_inputs) -> tuple:
    """What must not change for a registered request: its item objects, their placement
    and their precomputed tensors (see ``_resident``)."""
    items = mm_inputs.mm_items
    embs = [getattr(it, "precomputed_embeddings", None) for it in items]
    return [*map(id, items), *map(id, embs), *[getattr(it, "offsets", None) for it in items]], (list(items), embs)


def _register(mm_inputs, device: torch.device) -> tuple[list, None]:
    return [_item_for(it, device) for it in mm_inputs.mm_items if it is not None], None


class _Encoders(Mapping):
    """The step's encoders by modality name, wrapped on first use: the engine's
    ``data_embedding_func_mapping``, else ``multimodal_model.get_<modality>_feature``."""

    def __init__(self, funcs: dict, model, rows_fn):
        self._funcs, self._model, self._rows_fn, self._made = funcs, model, rows_fn, {}

    def _func(self, modality: str):
        return self._funcs.get(modality) or getattr(self._model, f"get_{modality}_feature", None)

    def __contains__(self, modality) -> bool:
        return self._func(modality) is not None

    def __getitem__(self, modality: str):
        if modality not in self._made:
            func = self._func(modality)
            if func is None:
                raise KeyError(modality)
            fn = self._rows_fn.get(modality) if isinstance(self._rows_fn, Mapping) else self._rows_fn
            self._made[modality] = _make_encoder(func, fn, modality)
        return self._made[modality]

    def __iter__(self):
        return iter(self._funcs)

    def __len__(self) -> int:
        return len(self._funcs)

def prepare_mm_inputs(
    input_ids: torch.Tensor,
    forward_batch,
    language_model,
    kwargs: dict,
    multimodal_model=None,
    data_embedding_funcs: Mapping | None = None,
    placeholder_tokens=None,
    use_deepstack: Mapping | None = None,
    feature_dtypes: Mapping | None = None,
    *,
    cache: EmbeddingCache | None | str = "default",
    rows_fn: RowsFn | Mapping[str, RowsFn] | None = None,
    backend: str = "auto",
) -> torch.Tensor | None:
    """SGLang's ``prepare_mm_inputs``: the batch's input embeddings, text-only and
    multimodal requests mixed.

    Reads the whole batch from ``forward_batch`` (``mm_inputs`` with ``None`` for a
    text-only request, ``extend_prefix_lens_cpu``, ``extend_seq_lens_cpu``), so every
    request's rows are located by its own window. Like the engine: decode and
    target-verify batches and batches without multimodal inputs take the text
    embedding; deepstack rows go to ``kwargs["input_deepstack_embeds"]``;
    ``forward_batch.mm_inputs`` is cleared, ``mm_input_embeds`` set (a copy for EAGLE)
    and a preallocated ``forward_batch.input_embeds`` is filled; a non-first pipeline
    rank returns ``None``. Not done: casting features to ``feature_dtypes`` and moving
    features to the CPU after the step (the engine's memory policy around its encoder).
    """
    embed_tokens = language_model.get_input_embeddings()
    pp_group = getattr(language_model, "pp_group", None)
    if pp_group is not None and not pp_group.is_first_rank:
        return None
    mode = forward_batch.forward_mode
    if not mode.is_decode() and not mode.is_target_verify() and forward_batch.contains_mm_inputs():
        input_embeds, other = embed_mm_inputs(
            forward_batch.mm_inputs, forward_batch.extend_prefix_lens_cpu,
            forward_batch.extend_seq_lens_cpu, input_ids, embed_tokens, multimodal_model,
            data_embedding_funcs, placeholder_tokens, use_deepstack, cache=cache, rows_fn=rows_fn,
            backend=backend)
        if use_deepstack:
            kwargs["input_deepstack_embeds"] = other["input_deepstack_embeds"]
        forward_batch.mm_inputs = None
        spec = getattr(forward_batch, "spec_algorithm", None)
        eagle = spec is not None and spec.is_eagle()
        forward_batch.mm_input_embeds = input_embeds.clone() if eagle else input_embeds
    else:
        input_embeds = embed_tokens(input_ids)
    if getattr(forward_batch, "input_embeds", None) is not None:
        forward_batch.input_embeds.copy_(input_embeds)
        input_embeds = forward_batch.input_embeds
    return input_embeds


def general_mm_embed_routine(
    input_ids: torch.Tensor,
    forward_batch,
    language_model,
    multimodal_model=None,
    data_embedding_funcs: Mapping | None = None,
    placeholder_tokens=None,
    use_deepstack: Mapping | None = None,
    feature_dtypes: Mapping | None = None,
    **kwargs,
):
    """SGLang's ``general_mm_embed_routine``: ``prepare_mm_inputs``, then the language
    model on the embeddings. ``cache``, ``rows_fn`` and ``backend`` may be passed as
    keywords; everything else in ``kwargs`` goes to the language model."""
    ours = {k: kwargs.pop(k) for k in ("cache", "rows_fn", "backend") if k in kwargs}
    input_embeds = prepare_mm_inputs(input_ids, forward_batch, language_model, kwargs, multimodal_model,
                                     data_embedding_funcs, placeholder_tokens, use_deepstack,
                                     feature_dtypes, **ours)
    return language_model(input_ids=None, forward_batch=forward_batch, input_embeds=input_embeds, **kwargs)
