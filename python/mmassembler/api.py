"""The public call: ``assemble(requests, input_ids, ...)`` -> the batch's input embeddings.

A stateless call is a first contact on the ``Assembler``'s machinery: the requests are
registered on a pooled ``StepCore`` (one per device and stream, grown by doubling), the
step is assembled there (windows checked, sources resolved for the items the windows
reach, one upload and one launch), and the requests are removed. Nothing is written to
the output or the cache until every check has passed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import torch

import mmkernels
from mmassembler.cache import EmbeddingCache
from mmassembler.core import StepCore
from mmassembler.encode import Encoder, EncoderFn
from mmassembler.errors import BatchShapeError, CapacityError, ChunkWindowError
from mmassembler.items import Request
from mmassembler.runs import MAX_REQUESTS, NO_LIMIT, request_columns
from mmassembler.step_inputs import check_buffer, check_cache, check_encoders, check_input_ids
from mmkernels import check_block_rows


class _Pool:
    """A ``StepCore`` for stateless calls on one device and stream, grown by doubling."""

    def __init__(self, device: torch.device, backend: str):
        self.device, self.backend = device, backend
        self.lock = threading.Lock()
        self.core: StepCore | None = None

    def core_for(self, requests: int, items: int, runs: int) -> StepCore:
        c = self.core
        if c is None or c.max_requests < requests or c.registry.max_items < items or (
                c.registry.max_runs < runs):
            r = _pow2(max(requests, 16 if c is None else c.max_requests))
            i = _pow2(max(items, 64 if c is None else c.registry.max_items))
            k = _pow2(max(runs, 2 * i, 0 if c is None else c.registry.max_runs))
            self.core = c = StepCore(self.device, backend=self.backend, max_tokens=NO_LIMIT,
                                     max_requests=min(r, MAX_REQUESTS), max_runs=k, max_items=i)
        return c


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_pools: dict = {}
_pools_lock = threading.Lock()


def _pool(device: torch.device, backend: str) -> _Pool:
    stream = torch._C._cuda_getCurrentRawStream(device.index or 0) if device.type == "cuda" else 0
    key = (device, stream, backend)
    pool = _pools.get(key)
    if pool is None:
        with _pools_lock:
            pool = _pools.setdefault(key, _Pool(device, backend))
    return pool


def _windows(requests) -> tuple[np.ndarray, np.ndarray]:
    """The requests' windows as int64 arrays; ``ChunkWindowError`` naming the request for
    a window that is not a pair of non-negative ints (at most 2**40) inside its prompt."""
    p = [r.prefix_len for r in requests]
    e = [r.extend_len for r in requests]
    pl = [r.prompt_len for r in requests]
    if not set(map(type, p + e)) <= {int} or not set(map(type, pl)) <= {int, type(None)}:
        for i, r in enumerate(requests):
            for name in ("prefix_len", "extend_len", "prompt_len"):
                v = getattr(r, name)
                if name == "prompt_len" and v is None:
                    continue
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                    raise ChunkWindowError(f"{name} must be a non-negative int, got {v!r}", request=i)
        p, e = [int(v) for v in p], [int(v) for v in e]
    pa, ea = np.array(p, dtype=object), np.array(e, dtype=object)
    bad = (pa < 0) | (ea < 0) | (pa > NO_LIMIT) | (ea > NO_LIMIT)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ChunkWindowError(f"window [{p[i]}, {p[i]} + {e[i]}) must have non-negative ints of at "
                               "most 2**40", request=i)
    pa, ea = np.array(p, np.int64), np.array(e, np.int64)
    lim = np.array([NO_LIMIT if x is None else min(x, NO_LIMIT) for x in pl], np.int64)
    past = pa + ea > lim
    if past.any():
        i = int(np.flatnonzero(past)[0])
        raise ChunkWindowError(f"chunk [{p[i]}, {p[i] + e[i]}) runs past the prompt of {pl[i]} "
                               "positions", request=i)
    return pa, ea


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
    widths, device, dtype = _check_step_buffers(int(e.sum()), input_ids, weight, out, deepstack_out)
    new = request_columns([(r.items, r.prompt_len) for r in requests])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    pool = _pool(device, which)
    with pool.lock:
        core = pool.core_for(len(requests), len(new.keys), 0)
        while True:
            try:
                handles = core.add(new)
                break
            except CapacityError:  # more runs than the pooled tables hold: double them
                core = pool.core_for(len(requests), len(new.keys), 2 * core.registry.max_runs)
        try:
            if weight is not None:
                out = torch.empty((int(e.sum()), widths[0]), dtype=dtype, device=device)
            op = core.op(hidden=widths[0], ds_cols=widths[1] - widths[0], dtype=dtype,
                         fused=weight is not None, block_rows=block_rows)
            return core.step(handles, p, e, lambda n: (out, deepstack_out, input_ids), weight=weight,
                             op=op, widths=widths, encoders=encoders, cache=cache)
        finally:
            core.remove(handles)
