"""The public call: ``assemble(requests, input_ids, ...)`` -> the batch's input embeddings.

Plan (items ∩ chunks -> segments), resolve sources (precomputed, cached, or encoded
once per modality), check every count, then one device-layer launch. Nothing is written
to the output or the cache until every check has passed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

import mmkernels
from mmkernels.ops import run_checked
from mmassembler.batch import Request
from mmassembler.cache import EmbeddingCache
from mmassembler.encode import Encoder, EncoderFn, resolve_sources
from mmassembler.errors import BatchShapeError
from mmassembler.planner import plan_batch
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


def prepare_batch(
    requests: Sequence[Request],
    input_ids: torch.Tensor | None,
    *,
    weight: torch.Tensor | None,
    out: torch.Tensor | None,
    deepstack_out: torch.Tensor | None,
    encoders,
    cache: EmbeddingCache | None,
    buffers_hold_more: bool = False,
    check_plan=None,
):
    """Check everything, plan, and resolve sources: ``(plan, sources, source info)``.

    Nothing is written before it returns. With ``buffers_hold_more`` (CUDA-graph mode)
    ``out``/``deepstack_out`` may have more rows than the batch has tokens, and
    ``input_ids`` is checked against the batch but not the buffers.
    """
    if (weight is None) == (out is None):
        raise BatchShapeError("pass exactly one of weight (fused mode) and out (scatter mode)")
    for r, req in enumerate(requests):
        if not isinstance(req, Request):
            raise BatchShapeError(f"requests[{r}] is a {type(req).__name__}, not a Request", request=r)
    plan = plan_batch(requests)  # checks windows and spans
    num_tokens = plan.num_tokens
    rows = None if buffers_hold_more else num_tokens
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] == 0:
            raise BatchShapeError("weight must be a 2-D [vocab, hidden] tensor with vocab >= 1")
        _check_buffer("weight", weight, weight.shape[0])
        hidden, device, dtype = weight.shape[1], weight.device, weight.dtype
    else:
        _check_buffer("out", out, rows)
        hidden, device, dtype = out.shape[1], out.device, out.dtype
    if input_ids is None:
        if weight is not None:
            raise BatchShapeError("fused mode (weight=...) needs input_ids")
    else:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.dtype not in (
                torch.int32, torch.int64):
            raise BatchShapeError("input_ids must be a 1-D int32/int64 tensor")
        if input_ids.device != device:
            raise BatchShapeError(f"input_ids are on {input_ids.device}, the embeddings on {device}")
        if input_ids.shape[0] != num_tokens:
            raise BatchShapeError(f"input_ids has {input_ids.shape[0]} tokens but the requests' "
                                  f"extend lengths add up to {num_tokens}")
    ds_cols = 0
    if deepstack_out is not None:
        _check_buffer("deepstack_out", deepstack_out, rows)
        if deepstack_out.dtype != dtype or deepstack_out.device != device:
            raise BatchShapeError(f"deepstack_out must be {dtype} on {device}, got "
                                  f"{deepstack_out.dtype} on {deepstack_out.device}")
        ds_cols = deepstack_out.shape[1]
    if check_plan is not None:  # capacity checks of the caller, before the cache changes
        check_plan(plan)
    widths = (hidden, hidden + ds_cols)
    stream = torch.cuda.current_stream(device) if cache is not None and device.type == "cuda" else None
    sources, info = resolve_sources(plan, encoders=encoders, cache=cache, device=device,
                                    dtype=dtype, widths=widths, stream=stream)
    return plan, sources, info


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
    plan, sources, info = prepare_batch(requests, input_ids, weight=weight, out=out,
                                        deepstack_out=deepstack_out, encoders=encoders, cache=cache)
    # Everything the device layer would check is checked: run without its second pass.
    if weight is not None:
        out = torch.empty((plan.num_tokens, weight.shape[1]), dtype=weight.dtype, device=weight.device)
    return run_checked(out, deepstack_out, sources, plan.segments, input_ids, weight, backend=backend,
                       block_rows=block_rows, info=info)
