"""Checking a step's arguments before anything is written: windows (vectorised) and buffers.

Every check raises a typed ``AssemblyError`` naming the request's index in the step.
The windows themselves are checked where the step is planned (``core``, ``fill``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from mmassembler.errors import BatchShapeError
from mmkernels import SUPPORTED_DTYPES

FLOATS = SUPPORTED_DTYPES  # the dtypes of embeddings, weights and outputs (defined once, device layer)


def int_array(values, name: str) -> np.ndarray:
    """A 1-D int64 array from a list, a numpy array or a CPU torch tensor (no copy if int64)."""
    if type(values) is np.ndarray and values.dtype == np.int64 and values.ndim == 1:
        return values
    if isinstance(values, torch.Tensor):
        if values.layout != torch.strided:
            raise BatchShapeError(f"{name} must be a dense 1-D tensor, got a {values.layout} one")
        if values.device.type != "cpu":
            raise BatchShapeError(f"{name} must be on the host (a list, numpy array or CPU tensor), "
                                  f"got a tensor on {values.device}: reading it would synchronise")
        values = values.detach().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise BatchShapeError(f"{name} must be a 1-D sequence of ints, got {arr.dtype} of shape "
                              f"{list(arr.shape)}")
    return arr.astype(np.int64, copy=False)


class StepSpec(NamedTuple):
    """What a step writes: ``hidden`` columns (plus ``ds_cols`` deepstack columns) of
    ``dtype`` on ``device``; ``fused``: text rows from a weight table."""

    hidden: int
    ds_cols: int
    dtype: torch.dtype
    device: torch.device
    fused: bool

    @property
    def widths(self) -> tuple:
        """The widths an embedding may have: ``hidden``, or ``hidden`` plus deepstack columns."""
        return (self.hidden, self.hidden + self.ds_cols)


def check_step_buffers(spec: StepSpec, n: int, out, deepstack_out, input_ids, weight, graph: bool):
    """Check a step's buffers for ``n`` tokens (and the weight in fused mode); returns
    ``(out, deepstack_out, input_ids)``, ``out`` made in fused mode when not given (a graph
    writes its persistent buffers: ``out`` stays ``None``)."""
    fused, w = spec.fused, weight
    if fused and (not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != spec.hidden
                  or w.dtype != spec.dtype or w.device != spec.device or w.shape[0] == 0):
        raise BatchShapeError(f"the weight is now {getattr(w, 'dtype', None)} "
                              f"{list(getattr(w, 'shape', []))} on {getattr(w, 'device', None)}; this "
                              f"Assembler was made for [*, {spec.hidden}] {spec.dtype} on {spec.device}")
    if fused or input_ids is not None:
        check_input_ids(input_ids, n, spec.device)
    if graph:
        if out is not None or deepstack_out is not None:
            raise BatchShapeError("a cuda_graph Assembler writes its persistent buffers; "
                                  "pass out/deepstack_out at construction")
        return None, None, input_ids
    if out is None:
        if not fused:
            raise BatchShapeError("scatter mode (no weight) needs out=")
        out = torch.empty((n, spec.hidden), dtype=spec.dtype, device=spec.device)
    else:
        check_rows_buffer("out", out, n, spec.hidden, spec.dtype, spec.device)
    if spec.ds_cols:
        if deepstack_out is None:
            raise BatchShapeError(f"deepstack_cols={spec.ds_cols}: pass deepstack_out=")
        check_rows_buffer("deepstack_out", deepstack_out, n, spec.ds_cols, spec.dtype, spec.device)
    elif deepstack_out is not None:
        raise BatchShapeError("deepstack_out given, but the Assembler has deepstack_cols=0")
    return out, deepstack_out, input_ids


def check_rows_buffer(name: str, t, rows: int, cols: int, dtype: torch.dtype,
                      device: torch.device) -> None:
    """A ``[rows, cols]`` buffer of ``dtype`` on ``device`` (``check_buffer``'s rules)."""
    check_buffer(name, t, rows, cols)
    if t.dtype != dtype or t.device != device:
        raise BatchShapeError(f"{name} is {t.dtype} on {t.device}, expected {dtype} on {device}")


def check_input_ids(input_ids, rows: int, device: torch.device) -> None:
    """1-D int32/int64 token ids on ``device``, one per row (any stride)."""
    if not isinstance(input_ids, torch.Tensor):
        raise BatchShapeError(f"input_ids must be a 1-D int32/int64 tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 1:
        raise BatchShapeError(f"input_ids must be 1-D (the batch's tokens, concatenated), got shape "
                              f"{list(input_ids.shape)}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise BatchShapeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    if input_ids.device != device:
        raise BatchShapeError(f"input_ids are on {input_ids.device}, the embeddings on {device}")
    if input_ids.shape[0] != rows:
        raise BatchShapeError(f"input_ids has {input_ids.shape[0]} tokens but the windows' extend "
                              f"lengths add up to {rows}")


def check_encoders(encoders) -> None:
    """``None`` or a mapping of modality -> callable or ``Encoder``."""
    from collections.abc import Mapping

    if encoders is None:
        return
    if not isinstance(encoders, Mapping):
        raise BatchShapeError(f"encoders must be a mapping of modality -> encoder, got "
                              f"{type(encoders).__name__}")
    for modality, enc in encoders.items():
        if not callable(enc) and not callable(getattr(enc, "fn", None)):
            raise BatchShapeError(f"encoders[{modality!r}] is a {type(enc).__name__}, not a callable "
                                  "or an Encoder")


def check_cache(cache) -> None:
    """``None`` or an ``EmbeddingCache`` (a dict would fail only at the step)."""
    from mmassembler.cache import EmbeddingCache

    if cache is not None and not isinstance(cache, EmbeddingCache):
        raise BatchShapeError(f"cache must be an mmassembler.EmbeddingCache or None, got "
                              f"{type(cache).__name__}")


def check_buffer(name: str, t, rows: int | None, cols: int | None = None) -> None:
    """A 2-D float buffer with unit column stride whose rows do not overlap; ``rows=None``
    leaves the row count free. Autograd is refused: assembly writes in place."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise BatchShapeError(f"{name} must be a 2-D tensor, got "
                              f"{getattr(t, 'shape', type(t).__name__)}")
    if (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        want = f"[{rows}, {cols}]" if cols is not None else f"[{rows}, *]"
        raise BatchShapeError(f"{name} has shape {list(t.shape)}, expected {want} "
                              "(rows = sum of extend_len)")
    if t.dtype not in FLOATS:
        raise BatchShapeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise BatchShapeError(f"{name} must have unit column stride, got strides {t.stride()}")
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        raise BatchShapeError(f"{name} has strides {t.stride()}: its rows overlap")
    if t.requires_grad and name != "weight":
        raise BatchShapeError(f"{name} requires grad: assembly writes it in place (inference); "
                              "pass a tensor made under torch.no_grad() or detach() it")
