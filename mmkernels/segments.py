"""Segment tables: checking them against their sources and outputs, before any write.

A segment ``(source, source first row, output first row, rows)`` copies ``rows``
consecutive rows. Segments are checked and sorted by output row in O(S log S) numpy
work: no per-token host loop, and no write can race (destinations are disjoint).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mmkernels.tables import SUPPORTED_DTYPES


def as_segment_array(segments) -> np.ndarray:
    """Return ``segments`` as an int64 numpy array of shape ``[S, 4]``."""
    if isinstance(segments, torch.Tensor):
        if segments.device.type != "cpu":
            raise ValueError("Invalid segments: expected a host (CPU) tensor, got one on "
                             f"{segments.device}; segments are host metadata")
        segments = segments.numpy()
    arr = np.asarray(segments, dtype=np.int64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"Invalid shape of segments: expected [S, 4], got {list(arr.shape)}")
    return arr


def check_output(name: str, t: torch.Tensor, rows: int | None = None) -> None:
    """A destination buffer: 2-D, unit column stride, a supported floating dtype."""
    if t.dim() != 2:
        raise ValueError(f"Invalid shape of {name}: expected 2-D, got {list(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"Invalid shape of {name}: expected {rows} rows, got {t.shape[0]}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Invalid dtype of {name}: expected one of {SUPPORTED_DTYPES}, got {t.dtype}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"Invalid strides of {name}: expected unit column stride, got {t.stride()}")
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        raise ValueError(f"Invalid strides of {name}: rows overlap (row stride {t.stride(0)} < "
                         f"{t.shape[1]} columns)")


def check_sources(
    sources: Sequence[torch.Tensor], device: torch.device, hidden: int, deepstack_cols: int
) -> None:
    """Every source is 2-D on ``device`` with ``hidden`` (or hidden + deepstack) columns."""
    widths = {hidden, hidden + deepstack_cols}
    for i, src in enumerate(sources):
        name = f"sources[{i}]"
        if not isinstance(src, torch.Tensor):
            raise ValueError(f"Invalid {name}: expected a torch.Tensor, got {type(src).__name__}")
        if src.dim() != 2:
            raise ValueError(f"Invalid shape of {name}: expected 2-D, got {list(src.shape)}")
        if src.shape[1] not in widths:
            raise ValueError(f"Invalid shape of {name}: expected {sorted(widths)} columns, "
                             f"got {src.shape[1]}")
        if src.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"Invalid dtype of {name}: expected one of {SUPPORTED_DTYPES}, "
                             f"got {src.dtype}")
        if src.device != device:
            raise ValueError(f"Invalid device of {name}: expected {device}, got {src.device}")
        if src.shape[1] > 1 and src.stride(1) != 1:
            raise ValueError(f"Invalid strides of {name}: expected unit column stride, "
                             f"got {src.stride()}")


def check_segments(
    segments, sources: Sequence[torch.Tensor], num_out_rows: int
) -> np.ndarray:
    """Check segments against source and output row counts; return them sorted by output row.

    Zero-row segments are dropped. Raises ``ValueError`` on a bad source index, a row
    range outside its source or the output, or two segments writing the same row.
    """
    segs = as_segment_array(segments)
    segs = segs[segs[:, 3] != 0]
    if len(segs) == 0:
        return segs
    src, src_row, out_row, rows = segs.T
    if (rows < 0).any():
        raise ValueError(f"Invalid segments: negative row count at {int(np.flatnonzero(rows < 0)[0])}")
    if (src < 0).any() or (src >= len(sources)).any():
        bad = int(np.flatnonzero((src < 0) | (src >= len(sources)))[0])
        raise ValueError(f"Invalid segments[{bad}]: source {int(src[bad])} not in [0, {len(sources)})")
    src_rows = np.fromiter((t.shape[0] for t in sources), np.int64, len(sources))
    bad_src = (src_row < 0) | (src_row + rows > src_rows[src])
    if bad_src.any():
        i = int(np.flatnonzero(bad_src)[0])
        raise ValueError(f"Invalid segments[{i}]: source rows [{src_row[i]}, {src_row[i] + rows[i]}) "
                         f"outside sources[{src[i]}] with {src_rows[src[i]]} rows")
    bad_out = (out_row < 0) | (out_row + rows > num_out_rows)
    if bad_out.any():
        i = int(np.flatnonzero(bad_out)[0])
        raise ValueError(f"Invalid segments[{i}]: output rows [{out_row[i]}, {out_row[i] + rows[i]}) "
                         f"outside the output's {num_out_rows} rows")
    order = np.argsort(out_row, kind="stable")
    segs = segs[order]
    overlap = segs[1:, 2] < segs[:-1, 2] + segs[:-1, 3]
    if overlap.any():
        i = int(np.flatnonzero(overlap)[0])
        raise ValueError(f"Invalid segments: two segments write output row {int(segs[i + 1, 2])}")
    return segs
