"""vLLM-shaped calls: the merge of encoder outputs into ``inputs_embeds``, and the
model runner's per-chunk gather, each as one launch.

- ``merge_multimodal_embeddings(inputs_embeds, multimodal_embeddings, is_multimodal)``:
  drop-in for ``_merge_multimodal_embeddings``; rows where ``is_multimodal`` is True take
  the flattened embeddings in order (no ``torch.cat``).
- ``embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=..., embed_tokens=...)``:
  the token lookup and the merge in one pass.
- ``gather_mm_embeddings(requests, encoder_cache, input_ids, embed_tokens=...)``: from what
  the runner has -- per request the computed and scheduled token counts and each item's
  placeholder range ``(offset, length, is_embed)`` -- straight to the batch's embeddings,
  replacing per-item slicing, ``torch.cat``, the host mask and the merge.

A count mismatch keeps vLLM's meaning ("Attempted to assign ... multimodal tokens to ...
placeholders") but is a typed ``RowCountError`` raised before any write.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from itertools import chain

import numpy as np
import torch

import mmkernels
from mmassembler.api import assemble
from mmassembler.items import Item, Request
from mmassembler.encode import Encoder
from mmassembler.engines._embedding import plain_table, text_rows
from mmassembler.engines._resident import resident_for
from mmassembler.runs import NO_LIMIT, NewRequests
from mmassembler.errors import BatchShapeError, EmbeddingFormatError, MissingEncoderError, RowCountError
from mmassembler.step_inputs import check_buffer

logger = logging.getLogger("mmassembler")


def _flatten(embeddings) -> list[torch.Tensor]:
    """NestedTensors (a tensor, or nested lists/tuples of them) as a list of 2-D tensors."""
    if isinstance(embeddings, torch.Tensor):
        if embeddings.dim() == 2:
            return [embeddings]
        return [t for e in embeddings for t in _flatten(e)] if embeddings.dim() > 2 else [
            embeddings.reshape(1, -1)]
    return [t for e in embeddings for t in _flatten(e)]


def _count_expression(parts: list[torch.Tensor]) -> str:
    sizes = [t.shape[0] for t in parts]
    if len(set(sizes)) == 1 and len(sizes) > 1:
        return f"{len(sizes)} x {sizes[0]}"
    return " + ".join(map(str, sizes)) or "0"


def _mask_segments(parts: list[torch.Tensor], is_multimodal: torch.Tensor) -> np.ndarray:
    """Segments placing the concatenated rows of ``parts`` on the True rows of the mask.

    O(tokens) numpy on the host mask (vLLM builds it on the host; a device mask is
    copied down, which synchronizes). Raises ``RowCountError`` when the counts differ.
    """
    mask = is_multimodal.detach()
    mask = (mask.cpu() if mask.device.type != "cpu" else mask).numpy().astype(bool, copy=False)
    pos = np.flatnonzero(mask)
    rows = np.array([t.shape[0] for t in parts], dtype=np.int64)
    total = int(rows.sum())
    if total != len(pos):
        raise RowCountError(f"Attempted to assign {_count_expression(parts)} = {total} multimodal "
                            f"tokens to {len(pos)} placeholders", expected=len(pos), returned=total)
    if total == 0:
        return np.zeros((0, 4), np.int64)
    src = np.repeat(np.arange(len(parts)), rows)
    first_row = np.cumsum(rows) - rows
    starts = np.concatenate(([0], np.flatnonzero((np.diff(pos) != 1) | (np.diff(src) != 0)) + 1))
    lengths = np.diff(np.append(starts, total))
    s = src[starts]
    return np.stack((s, starts - first_row[s], pos[starts], lengths), axis=1)


def _check_mask(is_multimodal, rows: int, what: str) -> None:
    if not isinstance(is_multimodal, torch.Tensor) or is_multimodal.dim() != 1:
        raise BatchShapeError(f"is_multimodal must be a 1-D tensor, got "
                              f"{getattr(is_multimodal, 'shape', type(is_multimodal).__name__)}")
    if is_multimodal.shape[0] != rows:
        raise BatchShapeError(f"is_multimodal has {is_multimodal.shape[0]} rows, {what} {rows}")


def _device_op(op, *args, **kwargs) -> torch.Tensor:
    """A device-layer call whose argument errors become typed ``AssemblyError``s."""
    try:
        return op(*args, **kwargs)
    except ValueError as exc:
        raise EmbeddingFormatError(str(exc)) from None


def merge_multimodal_embeddings(inputs_embeds: torch.Tensor, multimodal_embeddings,
                                is_multimodal: torch.Tensor, *,
                                deepstack_out: torch.Tensor | None = None) -> torch.Tensor:
    """``inputs_embeds[is_multimodal] = cat(multimodal_embeddings)`` in one launch, in place.
    With ``deepstack_out``, the columns past ``hidden`` go there (see ``gather_mm_embeddings``)."""
    parts = _flatten(multimodal_embeddings)
    _check_mask(is_multimodal, inputs_embeds.shape[0], "inputs_embeds")
    segments = _mask_segments(parts, is_multimodal)
    return _device_op(mmkernels.gather_rows, inputs_embeds, parts, segments, deepstack_out=deepstack_out)


def embed_input_ids(input_ids: torch.Tensor, multimodal_embeddings=None, *,
                    is_multimodal: torch.Tensor | None = None, embed_tokens,
                    deepstack_out: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings with the multimodal rows merged, in one pass over the output.

    ``embed_tokens`` is the model's embedding module, its weight, or any callable
    ``ids -> [n, hidden]`` (e.g. the language model's own ``embed_input_ids``, which
    carries Gemma3's scale). Only a plain ``nn.Embedding`` (or a weight) is looked up in
    the same pass; anything else is called and the multimodal rows are written over its
    output, so a scaled or tensor-parallel embedding is never bypassed. ``deepstack_out``
    as in ``gather_mm_embeddings``.
    """
    weight = plain_table(embed_tokens)
    empty = multimodal_embeddings is None or len(_flatten(multimodal_embeddings)) == 0
    if not empty:
        if is_multimodal is None:
            raise BatchShapeError("`embed_input_ids` requires `is_multimodal` with multimodal embeddings")
        _check_mask(is_multimodal, input_ids.shape[0], "input_ids")
    parts = [] if empty else _flatten(multimodal_embeddings)
    segments = np.zeros((0, 4), np.int64) if empty else _mask_segments(parts, is_multimodal)
    if weight is not None:
        return _device_op(mmkernels.embed_and_gather, input_ids, weight, parts, segments,
                          deepstack_out=deepstack_out)
    rows = text_rows(embed_tokens, input_ids)
    return _device_op(mmkernels.gather_rows, rows, parts, segments, deepstack_out=deepstack_out)


def _identifier(feature):
    return getattr(feature, "identifier", None) or getattr(feature, "mm_hash")


def _item_for(feature, embedding, req_id=None) -> Item:
    """Our ``Item`` for a feature (placeholder range; the encoder-cache entry when given)."""
    pos = feature.mm_position
    span = (int(pos.offset), int(pos.offset) + int(pos.length) - 1)
    return Item(_identifier(feature), [span], modality=str(getattr(feature, "modality", "image")),
                embedding=embedding, embed_mask=getattr(pos, "is_embed", None), data=(feature, req_id))


def _scheduled(requests: Sequence, num_scheduled_tokens) -> list[int]:
    """This step's token count per request, from the scheduler output's dict (by
    ``req_id``), a sequence in request order, or each request's own attribute; a typed
    error naming the request for anything missing."""
    if num_scheduled_tokens is None:
        missing = [i for i, r in enumerate(requests) if not hasattr(r, "num_scheduled_tokens")]
        if missing:
            raise BatchShapeError("pass num_scheduled_tokens= (the scheduler output's num_scheduled_tokens dict): "
                                  "the runner's request states do not carry this step's counts", request=missing[0])
        return [int(r.num_scheduled_tokens) for r in requests]
    if isinstance(num_scheduled_tokens, Mapping):
        counts = [num_scheduled_tokens.get(getattr(r, "req_id", None)) for r in requests]
        if None in counts:
            i = counts.index(None)
            raise BatchShapeError(f"num_scheduled_tokens has no entry for request {getattr(requests[i], 'req_id', None)!r}"
                                  " (a request of the batch the scheduler did not schedule?)", request=i)
        return [int(n) for n in counts]
    if len(num_scheduled_tokens) != len(requests):
        raise BatchShapeError(f"num_scheduled_tokens has {len(num_scheduled_tokens)} entries for "
                              f"{len(requests)} requests")
    return [int(n) for n in num_scheduled_tokens]


def _check_requests(requests) -> None:
    """A list of request states in batch order (``[self.requests[r] for r in
    self.input_batch.req_ids]``), each with ``mm_features`` and ``num_computed_tokens``."""
    if isinstance(requests, Mapping) or not isinstance(requests, (list, tuple)):
        raise BatchShapeError(f"requests must be a list of the runner's CachedRequestState in batch order "
                              f"([self.requests[r] for r in self.input_batch.req_ids]), got "
                              f"{type(requests).__name__}")
    for i, r in enumerate(requests):
        if not hasattr(r, "mm_features") or not hasattr(r, "num_computed_tokens"):
            raise BatchShapeError(f"requests[{i}] is a {type(r).__name__}, not a request state (it needs "
                                  "mm_features and num_computed_tokens)", request=i)


def gather_mm_embeddings(requests: Sequence, encoder_cache: Mapping, input_ids: torch.Tensor, *,
                         num_scheduled_tokens: Mapping | Sequence[int] | None = None,
                         shift_computed_tokens: int = 0, embed_tokens=None,
                         out: torch.Tensor | None = None, deepstack_out: torch.Tensor | None = None,
                         backend: str = "auto", max_tokens: int | None = None,
                         max_requests: int | None = None) -> torch.Tensor:
    """The batch's input embeddings from the runner's state, in one launch: the runner's
    ``_gather_mm_embeddings`` followed by the model's ``embed_input_ids``.

    ``requests``: the runner's ``CachedRequestState``s in batch order (``req_id``,
    ``num_computed_tokens``, ``mm_features`` with ``identifier`` and ``mm_position``:
    ``offset``, ``length``, ``is_embed``). Each is registered on a resident ``Assembler``
    the first step it appears (again only if its features change) and removed when the
    runner drops it; a feature's encoder output is read from ``encoder_cache`` in place the
    first step a window reaches it and held until windows have passed it. A feature a
    window reaches that is not in ``encoder_cache`` is a ``MissingEncoderError`` naming the
    request and identifier. ``num_scheduled_tokens``: the scheduler output's dict (or a
    sequence in request order). ``shift_computed_tokens`` moves every window forward (the
    drafter's look-ahead); as in the runner, a feature that starts at or after the processed
    boundary and is not encoded yet keeps its token embeddings (such steps take the
    stateless path). ``embed_tokens``: a plain ``nn.Embedding`` (or weight) is looked up in
    the same pass; any other module or callable (Gemma3's scaled embedding, a
    tensor-parallel embedding, the model's own ``embed_input_ids``) computes the text rows,
    into ``out`` when given. With ``out`` alone, text rows keep what the buffer holds and only
    multimodal rows are written. ``deepstack_out`` ``[tokens, levels * hidden]`` takes the
    columns past ``hidden`` of each embedding (Qwen3-VL's multiscale features; zero on text
    rows in fused mode, as the buffer was otherwise; the engine's ``[levels, tokens, hidden]``
    is ``deepstack_out.view(tokens, levels, hidden).permute(1, 0, 2)``). ``max_tokens`` and
    ``max_requests`` (the runner's ``max_num_tokens`` and ``max_num_reqs``, i.e. vLLM's
    ``max_num_batched_tokens`` and ``max_num_seqs``) size the resident tables once; without
    them a step that does not fit grows them.
    """
    _check_requests(requests)
    counts = _scheduled(requests, num_scheduled_tokens)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
        raise BatchShapeError(f"input_ids must be a 1-D tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
    if out is not None:  # checked before anything is computed into it
        check_buffer("out", out, input_ids.shape[0])
    weight = plain_table(embed_tokens) if embed_tokens is not None else None
    fused = weight is not None  # the lookup in the kernel's pass, written into out (or a new tensor)
    rows = out
    if embed_tokens is not None and not fused:
        # text rows into a tensor of their own: out is written only once every check has passed
        rows = text_rows(embed_tokens, input_ids)
        if out is not None and (rows.dtype != out.dtype or rows.shape != out.shape):
            raise BatchShapeError(f"embed_tokens gives {rows.dtype} {list(rows.shape)} rows, out is "
                                  f"{out.dtype} {list(out.shape)}")
    if not fused and rows is None:
        raise BatchShapeError("gather_mm_embeddings needs embed_tokens (text rows) or out (a buffer to "
                              "write multimodal rows into)")
    if shift_computed_tokens:
        got = _gather_stateless(requests, counts, encoder_cache, input_ids, int(shift_computed_tokens),
                                weight if fused else None, rows if not fused else None, deepstack_out, backend)
    else:
        ds_cols = 0 if deepstack_out is None else int(deepstack_out.shape[1])
        key = embed_tokens if embed_tokens is not None else _SCATTER
        resident = resident_for(key, weight, weight if fused else rows, ds_cols, backend, max_tokens, max_requests)
        prefix = [int(r.num_computed_tokens) for r in requests]
        got = resident.step(requests, _fingerprints, _columns, prefix, counts, input_ids,
                            encoders=_EncoderCache(encoder_cache), cache=None,
                            out=out if fused else rows, deepstack_out=deepstack_out)
    if out is not None and got is not out:
        out.copy_(got)
        return out
    return got


class _Key:
    """A weakly referable key: the resident Assembler of calls without ``embed_tokens``."""


_SCATTER = _Key()


def _features_of(states: list) -> tuple[list, list]:
    lists = [r.mm_features for r in states]
    return list(chain.from_iterable(lists)), list(map(len, lists))


def _fingerprints(states: list) -> list:
    """Per request, what must not change while it is registered: its features and their
    placeholder ranges (by identity), offsets, lengths and ``is_embed`` masks (by identity).
    The ranges are held, so their ids cannot be reused. A fixed number of calls a batch."""
    flat, counts = _features_of(states)
    pos = [f.mm_position for f in flat]
    ids, pids = list(map(id, flat)), list(map(id, pos))
    offs, lens = [p.offset for p in pos], [p.length for p in pos]
    masks = list(map(id, [getattr(p, "is_embed", None) for p in pos]))
    fps, a = [], 0
    for c in counts:
        b = a + c
        fps.append((ids[a:b], pids[a:b], offs[a:b], lens[a:b], masks[a:b], flat[a:b], pos[a:b]))
        a = b
    return fps


def _keys(flat: list) -> list:
    try:
        keys = [f.identifier for f in flat]
    except AttributeError:
        keys = [None] * len(flat)
    if None in keys or "" in keys:
        keys = [_identifier(f) for f in flat]
    return keys


def _columns(states: list) -> NewRequests:
    """The new requests' features as registry columns, read straight from the runner's
    objects: the identifier is the key, the placeholder range the span (``is_embed`` its
    mask); the encoder is handed ``(feature, req_id)``."""
    flat, counts = _features_of(states)
    pos = [f.mm_position for f in flat]
    spans = [((p.offset, p.offset + p.length - 1),) for p in pos]
    rids = list(chain.from_iterable([getattr(r, "req_id", None)] * c for r, c in zip(states, counts)))
    return NewRequests(counts, [NO_LIMIT] * len(counts), _keys(flat), spans,
                       [getattr(p, "is_embed", None) for p in pos],
                       [getattr(f, "modality", "image") for f in flat], [None] * len(flat),
                       list(zip(flat, rids)))


class _EncoderCache(Mapping):
    """The runner's encoder cache as a ``stable`` encoder for every modality: an item's
    rows are its entry, read in place."""

    def __init__(self, cache: Mapping):
        self._cache = cache
        self._enc = Encoder(self._lookup, stable=True)

    def _lookup(self, features) -> list:
        keys = _keys([f for f, _ in features])
        found = list(map(self._cache.get, keys))
        missing = [t is None for t in found]  # ``is``: ``None in`` would call Tensor.__eq__ per entry
        if True in missing:
            i = missing.index(True)
            raise MissingEncoderError(f"request {features[i][1]!r}: feature {keys[i]!r} is not in the "
                                      "encoder cache (vLLM: 'Encoder cache miss')", item_key=keys[i])
        return found

    def __contains__(self, modality) -> bool:
        return True

    def __getitem__(self, modality):
        return self._enc

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def _gather_stateless(requests, counts, encoder_cache, input_ids, shift, weight, rows, deepstack_out,
                      backend) -> torch.Tensor:
    """A look-ahead step (``shift_computed_tokens``): windows past the processed boundary,
    where a feature not encoded yet keeps its token embeddings."""
    reqs = []
    for r, n in zip(requests, counts):
        done = int(r.num_computed_tokens)
        items = []
        for f in r.mm_features:
            embedding = encoder_cache.get(_identifier(f))
            if embedding is None and int(f.mm_position.offset) >= done + n:
                continue  # only the look-ahead reaches it: token embeddings, as the runner does
            items.append(_item_for(f, embedding, getattr(r, "req_id", None)))
        reqs.append(Request(items, done + shift, n))
    if weight is not None:
        return assemble(reqs, input_ids, weight=weight, deepstack_out=deepstack_out, backend=backend)
    return assemble(reqs, input_ids, out=rows, deepstack_out=deepstack_out, backend=backend)


# -- turning it on in an unmodified vLLM ----------------------------------------------------------
_GATHER_PARAMS = ("self", "scheduler_output", "shift_computed_tokens")
_MERGE_PARAMS = ("inputs_embeds", "multimodal_embeddings", "is_multimodal")
_EMBED_PARAMS = ("self", "input_ids", "multimodal_embeddings")
_switch = None  # patching.Switch: on while apply() is in effect (made on first use)


class _Assembled(list):
    """What the patched runner gather hands ``embed_input_ids``: the step's input
    embeddings, already assembled (a one-element list, so the runner's checks pass)."""


def apply(*, backend: str | None = None, max_tokens: int | None = None, max_requests: int | None = None) -> bool:
    """Point vLLM's model runner at ours: ``GPUModelRunner._gather_mm_embeddings`` assembles
    the whole step in one launch (for models that keep the default ``embed_input_ids``,
    whose ``SupportsMultiModal.embed_input_ids`` then returns it), and
    ``_merge_multimodal_embeddings`` (models that merge themselves) becomes ours, one launch
    instead of a concatenation and a masked write. Steps the drop-in does not cover
    (the drafter's look-ahead, prompt embeddings, multimodal pruning, out-of-vocabulary
    media tokens, models with their own ``embed_input_ids``) keep the runner's own code.
    Options: ``backend``, ``max_tokens`` and ``max_requests`` (the runner's own limits
    when unset; ``MMASSEMBLER_BACKEND``, ``MMASSEMBLER_MAX_TOKENS``,
    ``MMASSEMBLER_MAX_REQUESTS``). Idempotent; ``EngineVersionError`` before anything
    changes when vLLM's targets are not the ones this drop-in was written for."""
    global _switch
    from mmassembler.engines.patching import EngineVersionError, Switch, check_signature
    from mmassembler.engines.sglang import _options

    _switch = _switch or Switch("mmassembler (vLLM)")
    if _switch.on:
        logger.info("mmassembler: vLLM is already pointed at mmassembler")
        return False

    try:
        from vllm.model_executor.models import interfaces, utils
        from vllm.v1.worker import gpu_model_runner
    except ImportError as exc:
        raise EngineVersionError(f"vLLM's model runner is not importable ({exc})") from None
    runner_cls = getattr(gpu_model_runner, "GPUModelRunner", None)
    mixin = getattr(interfaces, "SupportsMultiModal", None)
    targets = ((runner_cls, "_gather_mm_embeddings", _GATHER_PARAMS), (utils, "_merge_multimodal_embeddings",
               _MERGE_PARAMS), (mixin, "embed_input_ids", _EMBED_PARAMS))
    for owner, name, params in targets:
        fn = getattr(owner, name, None)
        if not callable(fn):
            raise EngineVersionError(f"vLLM has no {name} where mmassembler's drop-in expects it: this vLLM version "
                                     "is not one it was written for; nothing was patched")
        check_signature(fn, params, f"vLLM's {name}")
    options = _options(backend, None, max_tokens, max_requests)
    original_gather = runner_cls.__dict__["_gather_mm_embeddings"]
    original_embed = mixin.__dict__["embed_input_ids"]
    original_merge = utils._merge_multimodal_embeddings

    def gather(self, scheduler_output, shift_computed_tokens: int = 0):
        model = self.model
        if (shift_computed_tokens or getattr(self, "enable_prompt_embeds", False)
                or (getattr(self, "is_multimodal_pruning_enabled", False) and getattr(self, "uses_mrope", False))
                or getattr(model, "_has_oov_mm_tokens", False)
                or getattr(type(model), "embed_input_ids", None) is not patched_embed):
            return original_gather(self, scheduler_output, shift_computed_tokens)
        total = scheduler_output.total_num_scheduled_tokens
        states = [self.requests[r] for r in self.input_batch.req_ids]
        embeds = gather_mm_embeddings(
            states, self.encoder_cache, self.input_ids.gpu[:total],
            num_scheduled_tokens=scheduler_output.num_scheduled_tokens,
            embed_tokens=model.get_language_model().embed_input_ids,
            backend=options.get("backend", "auto"),
            max_tokens=options.get("max_tokens", getattr(self, "max_num_tokens", None)),
            max_requests=options.get("max_requests", getattr(self, "max_num_reqs", None)))
        return _Assembled([embeds]), None

    def patched_embed(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if type(multimodal_embeddings) is _Assembled:
            embeds = multimodal_embeddings[0]
            if embeds.shape[0] != input_ids.shape[0]:
                raise BatchShapeError(f"embed_input_ids got {input_ids.shape[0]} ids for a step assembled for "
                                      f"{embeds.shape[0]}")
            return embeds
        return original_embed(self, input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def merge(inputs_embeds, multimodal_embeddings, is_multimodal):
        if (not isinstance(is_multimodal, torch.Tensor) or is_multimodal.device.type != "cpu"
                or not isinstance(inputs_embeds, torch.Tensor)):
            # a mask on the device would be read back (a sync): the engine's own merge
            return original_merge(inputs_embeds, multimodal_embeddings, is_multimodal)
        return merge_multimodal_embeddings(inputs_embeds, multimodal_embeddings, is_multimodal)

    import functools

    gather = functools.wraps(original_gather)(gather)
    patched_embed = functools.wraps(original_embed)(patched_embed)
    merge = functools.wraps(original_merge)(merge)
    patches = _switch.begin()
    patches.replace(runner_cls, "_gather_mm_embeddings", gather)
    patches.replace(mixin, "embed_input_ids", patched_embed)
    patches.replace(utils, "_merge_multimodal_embeddings", merge, everywhere=True)
    return True


def unapply() -> bool:
    """Restore every original ``apply()`` replaced; False when nothing was applied."""
    return _switch is not None and _switch.end()
