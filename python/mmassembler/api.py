"""The public call: ``assemble(requests, input_ids, ...)`` -> the batch's input embeddings.

A stateless call is a first contact on the ``Assembler``'s machinery: the requests are
registered on a ``StepCore`` over the device's pooled tables (``mmkernels.pool``: one per
device, stream and backend, sized for the call before anything is written), the step is
planned and run there (windows checked, sources resolved for the items the windows
reach, one upload and one launch), and the requests are removed. Nothing is written to
the output or the cache until every check has passed. A call made from inside another on
the same thread (an encoder that calls ``assemble``) runs on tables of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

import mmkernels
from mmassembler.cache import EmbeddingCache
from mmassembler.core import StepCore
from mmassembler.encode import Encoder, EncoderFn
from mmassembler.errors import BatchShapeError, CapacityError, ChunkWindowError
from mmassembler.items import Request
from mmassembler.runs import MAX_REQUESTS, NO_LIMIT, build_runs, request_columns
from mmassembler.step_inputs import StepSpec, check_buffer, check_cache, check_encoders, check_input_ids
from mmkernels import capacity_for, check_block_rows, table_pool



def _core_on(pool, nested: bool, requests: int, items: int, runs: int) -> StepCore:
    """A ``StepCore`` over the pool's tables (grown to fit the call: ``TablePool.fit``), or,
    for a call nested inside another on this thread, over tables of its own."""
    if requests > MAX_REQUESTS:
        raise CapacityError(f"{requests} requests in one call exceed the limit of {MAX_REQUESTS}")
    if nested:
        return StepCore(pool.device, backend=pool.backend, max_tokens=NO_LIMIT, max_requests=max(requests, 1),
                        max_runs=max(runs, 1), max_items=max(items, 1))
    tables, ops = pool.fit(requests, runs)
    core = pool.host
    if core is None or core.registry.max_items < items:
        core = pool.host = StepCore(
            pool.device, backend=pool.backend, max_tokens=NO_LIMIT, max_requests=tables.max_requests,
            max_runs=tables.max_runs, max_items=capacity_for(items, 0 if core is None else core.registry.max_items, 64),
            tables=tables, ops=ops)
    return core


def _windows(requests) -> tuple[list, list]:
    """The requests' windows as lists of ints; ``ChunkWindowError`` naming the request for
    a window that is not a pair of non-negative ints (at most 2**40) inside its prompt."""
    p = [r.prefix_len for r in requests]
    e = [r.extend_len for r in requests]
    pl = [r.prompt_len for r in requests]
    if not set(map(type, p)) | set(map(type, e)) <= _INT or not set(map(type, pl)) <= _INT_OR_NONE:
        for i, r in enumerate(requests):
            for name in ("prefix_len", "extend_len", "prompt_len"):
                v = getattr(r, name)
                if name == "prompt_len" and v is None:
                    continue
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                    raise ChunkWindowError(f"{name} must be a non-negative int, got {v!r}", request=i)
        p, e = [int(v) for v in p], [int(v) for v in e]
        pl = [None if v is None else int(v) for v in pl]
    for i, (a, b, lim) in enumerate(zip(p, e, pl)):
        if a < 0 or b < 0 or a > NO_LIMIT or b > NO_LIMIT:
            raise ChunkWindowError(f"window [{a}, {a} + {b}) must have non-negative ints of at most 2**40",
                                   request=i)
        if lim is not None and a + b > lim:
            raise ChunkWindowError(f"chunk [{a}, {a + b}) runs past the prompt of {lim} positions", request=i)
    return p, e


_INT, _INT_OR_NONE = {int}, {int, type(None)}


def _check_step_buffers(num_tokens: int, input_ids, weight, out, deepstack_out):
    """Check the call's mode and buffers against its token count; ``(widths, device, dtype)``."""
    if (weight is None) == (out is None):
        raise BatchShapeError("pass exactly one of weight (fused mode) and out (scatter mode)")
    if weight is not None:
        if isinstance(weight, torch.nn.Module):
            raise BatchShapeError(f"weight is a {type(weight).__name__} module; pass its table "
                                  "(for nn.Embedding: weight=embedding.weight)")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] == 0:
            raise BatchShapeError("weight must be a 2-D [vocab, hidden] tensor with vocab >= 1")
        check_buffer("weight", weight, weight.shape[0])
        hidden, device, dtype = weight.shape[1], weight.device, weight.dtype
    else:
        check_buffer("out", out, num_tokens)
        hidden, device, dtype = out.shape[1], out.device, out.dtype
    if input_ids is None:
        if weight is not None:
            raise BatchShapeError("fused mode (weight=...) needs input_ids")
    else:
        check_input_ids(input_ids, num_tokens, device)
    ds_cols = 0
    if deepstack_out is not None:
        check_buffer("deepstack_out", deepstack_out, num_tokens)
        if deepstack_out.dtype != dtype or deepstack_out.device != device:
            raise BatchShapeError(f"deepstack_out must be {dtype} on {device}, got "
                                  f"{deepstack_out.dtype} on {deepstack_out.device}")
        ds_cols = deepstack_out.shape[1]
    return (hidden, hidden + ds_cols), device, dtype


def assemble(
    requests: Sequence[Request],
    input_ids: torch.Tensor | None,
    *,
    weight: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    deepstack_out: torch.Tensor | None = None,
    encoders: Mapping[str, EncoderFn | Encoder] | None = None,
    cache: EmbeddingCache | None = None,
    backend: str = "auto",
    block_rows: int | None = None,
) -> torch.Tensor:
    """Assemble the input embeddings of a chunked-prefill batch.

    Row ``base_r + pos - prefix_len_r`` of the result is, for position ``pos`` of request
    ``r``: the matching row of the item whose placeholder takes ``pos``; otherwise
    ``weight[clamp(input_ids[row], 0, vocab - 1)]`` (fused mode) or what ``out`` held
    (scatter mode).

    Parameters
    ----------
    requests : sequence of Request
        Each request's items and chunk window ``[prefix_len, prefix_len + extend_len)``.
    input_ids : torch.Tensor
        shape ``[sum(extend_len)]``, the batch's token ids (may be ``None`` in scatter mode).
    weight : torch.Tensor, optional
        shape ``[vocab, hidden]``: fused mode, returns a new ``[tokens, hidden]`` tensor.
    out : torch.Tensor, optional
        shape ``[tokens, hidden]``: scatter mode, multimodal rows are written in place.
        Exactly one of ``weight`` and ``out``.
    deepstack_out : torch.Tensor, optional
        shape ``[tokens, k * hidden]``: receives embedding columns past ``hidden``
        (zeros for text rows in fused mode, and for embeddings without them).
    encoders : mapping of modality -> callable or Encoder
        ``fn(items) -> [tensor per item]`` or ``(tensor, rows_per_item)``.
    cache : EmbeddingCache, optional
        Read before encoding (under each encoder's identity); receives what was encoded.
    backend : str
        ``"auto"``, ``"torch"`` or ``"triton"``; ``mmkernels.resolve_backend`` says which runs.
    block_rows : int, optional
        Rows per kernel program (tests vary it).

    Raises
    ------
    AssemblyError
        On any bad input, naming the request and item, before anything is written.
    """
    if not isinstance(requests, (list, tuple)):
        raise BatchShapeError(f"requests must be a list of Request, got {type(requests).__name__}")
    if not set(map(type, requests)) <= {Request}:
        r = next(i for i, x in enumerate(requests) if not isinstance(x, Request))
        raise BatchShapeError(f"requests[{r}] is a {type(requests[r]).__name__}, not a Request", request=r)
    try:
        check_block_rows(block_rows)
        ref = weight if weight is not None else out
        which = mmkernels.resolve_backend(backend, ref.device) if isinstance(ref, torch.Tensor) else None
    except ValueError as exc:
        raise BatchShapeError(str(exc)) from None
    check_encoders(encoders)
    check_cache(cache)
    p, e = _windows(requests)
    widths, device, dtype = _check_step_buffers(sum(e), input_ids, weight, out, deepstack_out)
    new = request_columns([(r.items, r.prompt_len) for r in requests])
    built = build_runs(new)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    spec = StepSpec(widths[0], widths[1] - widths[0], dtype, device, weight is not None)
    pool = table_pool(device, which)
    with pool.hold() as nested:
        core = _core_on(pool, nested, len(requests), len(new.keys), len(built.rpos))
        handles = core.add(new, built)
        try:
            op = core.op(hidden=widths[0], ds_cols=widths[1] - widths[0], dtype=dtype,
                         fused=weight is not None, block_rows=block_rows)
            return core.run(core.plan(handles, p, e, spec=spec, op=op, weight=weight,
                                      input_ids=input_ids, out=out, deepstack_out=deepstack_out,
                                      encoders=encoders, cache=cache))
        finally:
            core.remove(handles)
