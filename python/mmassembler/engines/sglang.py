"""SGLang's ``general_mm_embed_routine``, ``prepare_mm_inputs`` and ``embed_mm_inputs``,
on a resident ``Assembler`` (see ``_resident``): a ``MultimodalInputs`` registers once.

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
from collections.abc import Mapping, Sequence
from itertools import chain

import torch

from mmassembler.runs import NO_LIMIT, NewRequests
from mmassembler.cache import EmbeddingCache
from mmassembler.engines._embedding import plain_table, text_rows
from mmassembler.engines._resident import resident_for
from mmassembler.engines._sglang_encoders import RowsFn, StepEncoders, modality_name
from mmassembler.identity import ObjectState
from mmassembler.errors import BatchShapeError

logger = logging.getLogger(__name__)

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


def _on_device(sg_item, emb, device: torch.device):
    """An offloaded precomputed embedding moved to the ids' device once (kept beside the
    item, holding only the engine's tensor and the copy: never the item itself)."""
    moved = _moved.get(sg_item)
    if moved is None or moved[0] is not emb:
        moved = _moved.set(sg_item, (emb, emb.to(device)))
    return moved[1]


class _Names(dict):
    """Modality -> our name (``Modality.IMAGE`` -> ``"image"``), keyed by the enum member's
    ``_name_`` (a str: hashing it costs no Python call)."""

    def __missing__(self, name):
        value = self[name] = name.lower()
        return value


_names = _Names()


def _modalities(items: list) -> list:
    try:
        return [_names[it.modality._name_] for it in items]
    except AttributeError:  # modalities given as strings (duck-typed items)
        return [modality_name(it.modality) for it in items]


def _items_of(owners: list) -> tuple[list, list]:
    """Every request's items (``None`` entries dropped) and their count per request."""
    lists = [m.mm_items for m in owners]
    flat = list(chain.from_iterable(lists))
    if True in [it is None for it in flat]:  # ``is``: an item's __eq__ compares its fields
        lists = [[it for it in x if it is not None] for x in lists]
        flat = list(chain.from_iterable(lists))
    return flat, list(map(len, lists))


def _fingerprints(owners: list) -> list:
    """Per request, what must not change while it is registered: its item objects (by
    identity), their hashes, their precomputed tensors (by identity) and the values of
    their offsets (copied, so an edit in place is seen). The list holds the items, so their
    ids cannot be reused while it is kept. A fixed number of calls for the whole batch."""
    flat, counts = _items_of(owners)
    ids = list(map(id, flat))
    hashes = [it.hash for it in flat]
    embs = list(map(id, [getattr(it, "precomputed_embeddings", None) for it in flat]))
    offs = [it.offsets for it in flat]
    sizes = list(map(len, offs))
    values = list(chain.from_iterable(chain.from_iterable(offs)))
    fps, a, o = [], 0, 0
    for c in counts:
        b = a + c
        k = o + 2 * sum(sizes[a:b])
        fps.append((flat[a:b], ids[a:b], hashes[a:b], embs[a:b], sizes[a:b], values[o:k]))
        a, o = b, k
    return fps


def _columns(owners: list, device: torch.device) -> NewRequests:
    """The new requests' items as registry columns, read straight from SGLang's objects: the
    hash is the key, offsets the spans; the encoder is handed the SGLang items."""
    flat, counts = _items_of(owners)
    embs = [getattr(it, "precomputed_embeddings", None) for it in flat]
    if any(e is not None and isinstance(e, torch.Tensor) and e.device != device for e in embs):
        embs = [_on_device(it, e, device) if isinstance(e, torch.Tensor) and e.device != device else e
                for it, e in zip(flat, embs)]
    return NewRequests(counts, [NO_LIMIT] * len(counts), [it.hash for it in flat],
                       [it.offsets for it in flat], [None] * len(flat), _modalities(flat), embs, flat)


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
    max_tokens: int | None = None,
    max_requests: int | None = None,
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
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        total = sum(int(n) for n in extend_seq_lens)
        if input_ids.shape[0] != total:
            raise BatchShapeError(
                f"input_ids has {input_ids.shape[0]} tokens but extend_seq_lens add up to {total}: "
                "embed_mm_inputs takes the multimodal requests' lists and their own tokens; for a batch's "
                "whole input_ids (text-only requests too) call general_mm_embed_routine or prepare_mm_inputs, "
                "which read every request from forward_batch")
    encoders = StepEncoders(data_embedding_func_mapping, multimodal_model, rows_fn)
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
    resident = resident_for(input_embedding, weight, ref, ds_cols, backend, max_tokens, max_requests)
    owners = [m if m is not None and getattr(m, "mm_items", None) else None for m in mm_inputs_list]
    embeds = resident.step(owners, _fingerprints, lambda m: _columns(m, device), extend_prefix_lens,
                           extend_seq_lens, input_ids, encoders=encoders, cache=cache,
                           out=embeds, deepstack_out=deepstack_out)
    other = {"input_deepstack_embeds": deepstack_out} if deepstack_out is not None else {}
    return embeds, other


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
    max_tokens: int | None = None,
    max_requests: int | None = None,
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
            backend=backend, max_tokens=max_tokens, max_requests=max_requests)
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


OPTIONS = ("cache", "rows_fn", "backend", "max_tokens", "max_requests")  # ours, beside the engine's


def _refuse_near_misses(kwargs: dict) -> None:
    """A keyword that is almost one of ``OPTIONS`` (``row_fn=``, ``caches=``) would be passed
    on to the language model without a word: name it instead."""
    import difflib

    for k in kwargs:
        close = difflib.get_close_matches(k, OPTIONS, n=1, cutoff=0.8)
        if close:
            raise BatchShapeError(f"unknown keyword {k!r}: did you mean {close[0]!r}? (mmassembler's options "
                                  f"are {', '.join(OPTIONS)}; other keywords go to the language model)")


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
):  # noqa: D417
    """SGLang's ``general_mm_embed_routine``: ``prepare_mm_inputs``, then the language
    model on the embeddings. ``OPTIONS`` (``cache``, ``rows_fn``, ``backend``,
    ``max_tokens``: SGLang's ``chunked_prefill_size``, ``max_requests``: its
    ``max_running_requests``) may be passed as keywords; a near-miss of one of them is a
    ``BatchShapeError``; everything else in ``kwargs`` goes to the language model."""
    ours = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
    _refuse_near_misses(kwargs)
    input_embeds = prepare_mm_inputs(input_ids, forward_batch, language_model, kwargs, multimodal_model,
                                     data_embedding_funcs, placeholder_tokens, use_deepstack,
                                     feature_dtypes, **ours)
    return language_model(input_ids=None, forward_batch=forward_batch, input_embeds=input_embeds, **kwargs)


# -- turning it on in an unmodified SGLang --------------------------------------------------------
_SIGNATURES = {
    "embed_mm_inputs": ("mm_inputs_list", "extend_prefix_lens", "extend_seq_lens", "input_ids", "input_embedding",
                        "multimodal_model", "data_embedding_func_mapping", "placeholder_tokens", "use_deepstack"),
    "prepare_mm_inputs": ("input_ids", "forward_batch", "language_model", "kwargs", "multimodal_model",
                          "data_embedding_funcs", "placeholder_tokens", "use_deepstack", "feature_dtypes"),
    "general_mm_embed_routine": ("input_ids", "forward_batch", "language_model", "multimodal_model",
                                 "data_embedding_funcs", "placeholder_tokens", "use_deepstack", "feature_dtypes"),
}
_switch = None  # patching.Switch: on while apply() is in effect (made on first use)


def apply(*, backend: str | None = None, cache_bytes: int | None = None, max_tokens: int | None = None,
          max_requests: int | None = None) -> bool:
    """Point SGLang's ``general_mm_embed_routine``, ``prepare_mm_inputs`` and
    ``embed_mm_inputs`` at ours, in ``sglang.srt.managers.mm_utils`` and in every module
    that imported them by name (model files imported later read the patched module).
    Options: ``backend``, ``cache_bytes`` (the adapter-wide cache), ``max_tokens``
    (SGLang's ``chunked_prefill_size``) and ``max_requests`` (``max_running_requests``);
    unset ones come from ``MMASSEMBLER_BACKEND``, ``MMASSEMBLER_CACHE_BYTES``,
    ``MMASSEMBLER_MAX_TOKENS`` and ``MMASSEMBLER_MAX_REQUESTS``. Idempotent (a second call
    changes nothing and returns False). ``EngineVersionError`` before anything changes when
    SGLang's targets are not the ones these drop-ins were written for."""
    global _switch, _default_cache
    from mmassembler.engines.patching import EngineVersionError, Switch, check_signature

    _switch = _switch or Switch("mmassembler (SGLang)")
    if _switch.on:
        logger.info("mmassembler: SGLang is already pointed at mmassembler")
        return False

    try:
        from sglang.srt.managers import mm_utils
    except ImportError as exc:
        raise EngineVersionError(f"SGLang's sglang.srt.managers.mm_utils is not importable ({exc})") from None
    for name, params in _SIGNATURES.items():
        if not callable(getattr(mm_utils, name, None)):
            raise EngineVersionError(f"sglang.srt.managers.mm_utils has no {name}: this SGLang version is not one "
                                     "mmassembler's drop-in was written for; nothing was patched")
        check_signature(getattr(mm_utils, name), params, f"sglang.srt.managers.mm_utils.{name}")
    options = _options(backend, cache_bytes, max_tokens, max_requests)
    if options.pop("cache_bytes", None) is not None:
        _default_cache = EmbeddingCache(int(_option_env("cache_bytes", cache_bytes)))
    patches = _switch.begin()
    ours = {"embed_mm_inputs": embed_mm_inputs, "prepare_mm_inputs": prepare_mm_inputs,
            "general_mm_embed_routine": general_mm_embed_routine}
    for name, fn in ours.items():
        patches.replace(mm_utils, name, _with_options(fn, getattr(mm_utils, name), options), everywhere=True)
    return True


def unapply() -> bool:
    """Restore every original ``apply()`` replaced; False when nothing was applied."""
    return _switch is not None and _switch.end()


_ENV = {"backend": "MMASSEMBLER_BACKEND", "cache_bytes": "MMASSEMBLER_CACHE_BYTES",
        "max_tokens": "MMASSEMBLER_MAX_TOKENS", "max_requests": "MMASSEMBLER_MAX_REQUESTS"}


def _option_env(name: str, value):
    if value is not None:
        return value
    raw = os.environ.get(_ENV[name])
    if raw is None or raw == "":
        return None
    return raw if name == "backend" else int(raw)


def _options(backend, cache_bytes, max_tokens, max_requests) -> dict:
    """The options given, else from the environment (``_ENV``); unset ones left out."""
    got = {name: _option_env(name, value) for name, value in
           (("backend", backend), ("cache_bytes", cache_bytes), ("max_tokens", max_tokens),
            ("max_requests", max_requests))}
    return {k: v for k, v in got.items() if v is not None}


def _with_options(fn, original, options: dict):
    """``fn`` with ``options`` as keyword defaults, named like the engine's ``original``."""
    import functools

    if not options:
        wrapped = functools.wraps(original)(lambda *a, **kw: fn(*a, **kw))
    else:
        wrapped = functools.wraps(original)(lambda *a, **kw: fn(*a, **{**options, **kw}))
    wrapped.__mmassembler__ = fn
    return wrapped
