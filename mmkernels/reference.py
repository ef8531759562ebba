"""Pure-torch twins of the device ops: the semantics, the CPU fallback and the test oracle.

Each function has the signature of its op in ``mmkernels.ops`` (less ``backend`` and
launch parameters) and is written to be obviously correct, not fast: one slice copy per
segment. ``segments`` must already be checked and sorted (``mmkernels.segments``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def gather_rows_ref(
    out: torch.Tensor,
    sources: Sequence[torch.Tensor],
    segments: np.ndarray,
    *,
    deepstack_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scatter mode: ``out[o:o+n] = sources[s][r:r+n, :hidden]`` for each segment ``(s, r, o, n)``.

    Reads and writes sum(n) x (hidden + deepstack columns) elements; other rows untouched.
    """
    hidden = out.shape[1]
    for s, r, o, n in segments.tolist():
        src = sources[s]
        out[o : o + n].copy_(src[r : r + n, :hidden])  # copy_ converts the dtype (round to nearest even)
        if deepstack_out is not None:
            extra = src[r : r + n, hidden:]
            if extra.shape[1]:
                deepstack_out[o : o + n].copy_(extra)
            else:  # a source without deepstack columns contributes zeros there
                deepstack_out[o : o + n].zero_()
    return out


def embed_and_gather_ref(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    sources: Sequence[torch.Tensor],
    segments: np.ndarray,
    *,
    out: torch.Tensor | None = None,
    deepstack_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused mode: ``out = weight[clamp(input_ids, 0, vocab-1)]``, then the segments on top.

    Text rows of ``deepstack_out`` are zero. Reads N x hidden (table rows) + segment rows,
    writes N x hidden; the kernel writes each row once, this reference twice.
    """
    vocab = weight.shape[0]
    text = weight[input_ids.clamp(0, vocab - 1).long()]
    if out is None:
        out = torch.empty(text.shape, dtype=weight.dtype, device=weight.device)
    out.copy_(text)
    if deepstack_out is not None:
        deepstack_out.zero_()
    return gather_rows_ref(out, sources, segments, deepstack_out=deepstack_out)
