"""The public call: ``assemble(requests, input_ids, ...)`` -> the batch's input embeddings.

The stateless path of the resident plan: the requests' runs (checked once per
``Request``) become one step of the step kernel (``request_step``), the items its windows
reach get sources (precomputed, cached, or encoded once per modality: ``resolve``, as in
the ``Assembler``), and the tables go up with one launch. Nothing is written to the
output or the cache until every check has passed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

import mmkernels
from mmassembler.batch import Request
from mmassembler.cache import EmbeddingCache
from mmassembler.encode import Encoder, EncoderFn
from mmassembler.errors import BatchShapeError
from mmassembler.request_step import request_step, step_sources
from mmassembler.step_inputs import check_input_ids
from mmkernels.ops import assemble_step
from mmkernels.step import check_block_rows


def _check_buffer(name: str, t: torch.Tensor, rows: int | None, cols: int | None = None) -> None:
    """A 2-D float buffer with unit column stride; ``rows=None`` leaves the row count free."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise BatchShapeError(f"{name} must be a 2-D tensor, got "
                              f"{getattr(t, 'shape', type(t).__name__)}")
    if (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        want = f"[{rows}, {cols}]" if cols is not None else f"[{rows}, *]"
        raise BatchShapeError(f"{name} has shape {list(t.shape)}, expected {want} "
                              "(rows = sum of extend_len)")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise BatchShapeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise BatchShapeError(f"{name} must have unit column stride, got strides {t.stride()}")
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        raise BatchShapeError(f"{name} has strides {t.stride()}: its rows overlap")


def _check_step_buffers(num_tokens: int, input_ids, weight, out, deepstack_out):
    """Check the call's mode and buffers against its token count; ``(widths, device, dtype)``."""
    if (weight is None) == (out is None):
        raise BatchShapeError("pass exactly one of weight (fused mode) and out (scatter mode)")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] == 0:
            raise BatchShapeError("weight must be a 2-D [vocab, hidden] tensor with vocab >= 1")
        _check_buffer("weight", weight, weight.shape[0])
        hidden, device, dtype = weight.shape[1], weight.device, weight.dtype
    else:
        _check_buffer("out", out, num_tokens)
        hidden, device, dtype = out.shape[1], out.device, out.dtype
    if input_ids is None:
        if weight is not None:
            raise BatchShapeError("fused mode (weight=...) needs input_ids")
    else:
        check_input_ids(input_ids, num_tokens, device)
    ds_cols = 0
    if deepstack_out is not None:
        _check_buffer("deepstack_out", deepstack_out, num_tokens)
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
        Read before encoding; receives what was encoded.
    backend : str
        ``"auto"``, ``"torch"`` or ``"triton"``; ``mmkernels.resolve_backend`` says which runs.
    block_rows : int, optional
        Rows per kernel program (tests vary it).

    Raises
    ------
    AssemblyError
        On any bad input, naming the request and item, before anything is written.
    """
    try:
        check_block_rows(block_rows)
        ref = weight if weight is not None else out
        if isinstance(ref, torch.Tensor):  # a bad backend fails before the cache changes
            mmkernels.resolve_backend(backend, ref.device)
    except ValueError as exc:
        raise BatchShapeError(str(exc)) from None
    step = request_step(requests)  # checks types, windows and spans
    widths, device, dtype = _check_step_buffers(step.num_tokens, input_ids, weight, out, deepstack_out)
    stream = torch.cuda.current_stream(device) if cache is not None and device.type == "cuda" else None
    sources, entries = step_sources(step, encoders=encoders, cache=cache, device=device,
                                    widths=widths, stream=stream)
    if weight is not None:
        out = torch.empty((step.num_tokens, widths[0]), dtype=dtype, device=device)
    return assemble_step(out, deepstack_out, input_ids, weight, step.runs, step.table, sources,
                         entries, backend=backend, block_rows=block_rows)
