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
    ``segments`` as ``gather_rows`` takes them (an array, a tensor or a list of 4-tuples).
    """
    hidden = out.shape[1]
    from mmkernels.segments import as_segment_array

    for s, r, o, n in as_segment_array(segments).tolist():
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


def assemble_step_ref(
    out: torch.Tensor,
    deepstack_out: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    weight: torch.Tensor | None,
    runs: np.ndarray,
    step: np.ndarray,
    sources: Sequence[torch.Tensor | None],
    first_rows: np.ndarray | None = None,
) -> torch.Tensor:
    """The step kernel's semantics from the host tables (``mmkernels/layout.py``).

    ``runs`` is the host run table (``HOST_RUN_*`` rows), ``step`` the filled step table,
    ``sources[slot]`` the 2-D source of each item slot a window reads, whose rows start at
    ``first_rows[slot]`` of it (0 when not given). Fused mode (``weight``) first writes every
    row's ``weight[clamp(id)]`` (and zeros to ``deepstack_out``), then each run's rows
    inside its request's window are copied over: reads and writes N x hidden in fused
    mode, the multimodal rows in scatter mode.
    """
    from mmkernels import layout as L

    n, num_req = int(step[0, L.STEP_TOKENS]), int(step[0, L.STEP_REQUESTS])
    if weight is not None:
        out[:n].copy_(weight[input_ids[:n].clamp(0, weight.shape[0] - 1).long()])
        if deepstack_out is not None:
            deepstack_out[:n].zero_()
    segments = []  # (slot, first source row, output row, rows)
    for i in range(num_req):
        base, prefix = int(step[1 + i, L.STEP_BASE]), int(step[1 + i, L.STEP_PREFIX])
        first, end = int(step[1 + i, L.STEP_RUN_FIRST]), int(step[1 + i, L.STEP_RUN_END])
        stop = prefix + int(step[2 + i, L.STEP_BASE]) - base
        for pos, run_end, row, slot in runs[first:end].tolist():
            a, z = max(pos, prefix), min(run_end, stop)
            if z > a:
                row0 = 0 if first_rows is None else int(first_rows[slot])
                segments.append((slot, row0 + row + a - pos, base + a - prefix, z - a))
    return gather_rows_ref(out, sources, np.array(segments, dtype=np.int64).reshape(-1, 4),
                           deepstack_out=deepstack_out)
