"""Launchers and the public device-layer ops: check inputs, choose a backend, launch once.

``gather_rows`` (scatter mode) writes segment rows into an existing buffer;
``embed_and_gather`` (fused mode) writes every output row in one pass: the token lookup
for text rows, segment rows for multimodal rows. Both read sources in place, with the
step kernel: the segments become the runs of one request that spans the output, staged
and sent with a one-request step table written by ``write_step_table`` (the helper every
step uses) on the device's pooled tables (``mmkernels.pool``).
"""

from __future__ import annotations

from collections.abc import Sequence
import numpy as np
import torch

from mmkernels import layout as L
from mmkernels.backend import resolve_backend
from mmkernels.reference import embed_and_gather_ref, gather_rows_ref
from mmkernels.segments import check_output, check_sources, check_segments
from mmkernels.pool import table_pool
from mmkernels.step_op import StepConfig, StepOps
from mmkernels.tables import ResidentTables, anchor_addresses, source_entry, write_step_table

def segment_runs(segs: np.ndarray, sources: Sequence[torch.Tensor], hidden: int) -> np.ndarray:
    """Device run rows of checked, sorted segments: segment ``(s, r, o, n)`` is the run
    ``[o, o + n)`` of one request whose window is the output, reading ``sources[s]`` from
    row ``r`` (one source entry per source, then a fixed number of numpy operations)."""
    anchors = anchor_addresses(sources[0].device) if len(sources) else {}
    entries = np.array([source_entry(t, hidden, anchors) for t in sources],
                       np.int64).reshape(len(sources), L.SOURCE_FIELDS)
    runs = np.empty((len(segs), L.HOST_RUN_FIELDS), np.int64)
    runs[:, L.HOST_RUN_POS] = segs[:, 2]
    runs[:, L.HOST_RUN_END] = segs[:, 2] + segs[:, 3]
    runs[:, L.HOST_RUN_ROW], runs[:, L.HOST_RUN_ITEM] = segs[:, 1], segs[:, 0]
    return L.device_runs(runs, entries[runs[:, L.HOST_RUN_ITEM]])


def _check_deepstack(deepstack_out: torch.Tensor | None, out: torch.Tensor) -> int:
    if deepstack_out is None:
        return 0
    check_output("deepstack_out", deepstack_out, rows=out.shape[0])
    if deepstack_out.dtype != out.dtype or deepstack_out.device != out.device:
        raise ValueError(f"Invalid deepstack_out: expected dtype {out.dtype} on {out.device}, "
                         f"got {deepstack_out.dtype} on {deepstack_out.device}")
    return deepstack_out.shape[1]


def gather_rows(
    out: torch.Tensor,
    sources: Sequence[torch.Tensor],
    segments,
    *,
    deepstack_out: torch.Tensor | None = None,
    backend: str = "auto",
    block_rows: int | None = None,
) -> torch.Tensor:
    """Scatter mode: copy each segment's rows from its source into ``out``, in place.

    ``out[o + i] = sources[s][r + i, :hidden]`` for every segment ``(s, r, o, n)`` and
    ``0 <= i < n``; other rows keep their contents.

    Parameters
    ----------
    out : torch.Tensor
        shape ``[num_tokens, hidden]``, float32/float16/bfloat16, unit column stride.
    sources : sequence of torch.Tensor
        each ``[rows_k, hidden]`` or ``[rows_k, hidden + deepstack]``, any row stride and
        supported floating dtype (converted on load), on ``out``'s device.
    segments : array-like
        shape ``[S, 4]`` int: ``(source index, source first row, output first row, rows)``;
        output ranges must be disjoint.
    deepstack_out : torch.Tensor, optional
        shape ``[num_tokens, deepstack]``; receives source columns past ``hidden``.
    backend : str
        ``"auto"``, ``"torch"`` or ``"triton"`` (see ``mmkernels.resolve_backend``).
    block_rows : int, optional
        rows per program (tests draw 1, 4, 16, 64).
    Example
    -------
    >>> out = torch.zeros(4, 2)
    >>> gather_rows(out, [torch.ones(3, 2)], [(0, 1, 2, 2)], backend="torch")[:, 0]
    tensor([0., 0., 1., 1.])
    """
    if torch.compiler.is_compiling():  # compiled callers get the custom op; eager skips the dispatcher
        torch.ops.mmkernels.gather_rows(out, list(sources), segments, deepstack_out, backend, block_rows)
        return out
    check_output("out", out)
    ds_cols = _check_deepstack(deepstack_out, out)
    check_sources(sources, out.device, out.shape[1], ds_cols)
    segs = check_segments(segments, sources, out.shape[0])
    return run_segments(out, deepstack_out, sources, segs, backend=backend, block_rows=block_rows)


def embed_and_gather(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    sources: Sequence[torch.Tensor],
    segments,
    *,
    out: torch.Tensor | None = None,
    deepstack_out: torch.Tensor | None = None,
    backend: str = "auto",
    block_rows: int | None = None,
) -> torch.Tensor:
    """Fused mode: token lookup for text rows and segment rows, one pass over the output.

    ``out[t] = sources[s][r + t - o]`` where row ``t`` lies in segment ``(s, r, o, n)``,
    else ``out[t] = weight[clamp(input_ids[t], 0, vocab - 1)]``. Text rows of
    ``deepstack_out`` are zero.

    Parameters
    ----------
    input_ids : torch.Tensor
        shape ``[num_tokens]``, int32/int64; out-of-vocabulary ids are clamped.
    weight : torch.Tensor
        shape ``[vocab, hidden]``, the token-embedding table, unit column stride.
    out : torch.Tensor, optional
        shape ``[num_tokens, hidden]``; allocated with ``weight``'s dtype when omitted.

    The other parameters are those of ``gather_rows``.

    Example
    -------
    >>> w = torch.arange(6.).reshape(3, 2)
    >>> embed_and_gather(torch.tensor([2, 0, 9]), w, [-torch.ones(1, 2)], [(0, 0, 1, 1)],
    ...                  backend="torch")[:, 0]
    tensor([ 4., -1.,  4.])
    """
    if torch.compiler.is_compiling():  # the custom ops carry every argument
        if out is None:
            return torch.ops.mmkernels.embed_and_gather(input_ids, weight, list(sources), segments,
                                                        deepstack_out, backend, block_rows)
        torch.ops.mmkernels.embed_and_gather_out(input_ids, weight, list(sources), segments, out,
                                                 deepstack_out, backend, block_rows)
        return out
    n, hidden = input_ids.shape[0], weight.shape[1]
    if input_ids.dim() != 1 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"Invalid input_ids: expected a 1-D int32/int64 tensor, got "
                         f"{input_ids.dtype} of shape {list(input_ids.shape)}")
    check_output("weight", weight)
    if weight.shape[0] == 0:
        raise ValueError("Invalid shape of weight: expected at least one vocabulary row, got 0")
    if out is None:
        out = torch.empty((n, hidden), dtype=weight.dtype, device=weight.device)
    check_output("out", out, rows=n)
    if out.shape[1] != hidden:
        raise ValueError(f"Invalid shape of out: expected [{n}, {hidden}], got {list(out.shape)}")
    for name, t in (("input_ids", input_ids), ("weight", weight)):
        if t.device != out.device:
            raise ValueError(f"Invalid device of {name}: expected {out.device}, got {t.device}")
    ds_cols = _check_deepstack(deepstack_out, out)
    check_sources(sources, out.device, hidden, ds_cols)
    segs = check_segments(segments, sources, n)
    return run_segments(out, deepstack_out, sources, segs, input_ids, weight, backend=backend,
                       block_rows=block_rows)


def run_segments(out: torch.Tensor, deepstack_out: torch.Tensor | None, sources: Sequence[torch.Tensor],
                 segs: np.ndarray, input_ids: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None, *, backend: str = "auto",
                 block_rows: int | None = None, config: StepConfig | None = None) -> torch.Tensor:
    """Run segments already checked and sorted by ``check_segments`` on the chosen
    backend; fused mode when ``weight`` is set (the public ops end here). On Triton the
    segments are the runs of one request spanning ``out``: one step of the step kernel
    through the device's pool of tables (``mmkernels.pool``)."""
    which = resolve_backend(backend, out.device)
    if which == "torch":
        if weight is None:
            return gather_rows_ref(out, sources, segs, deepstack_out=deepstack_out)
        return embed_and_gather_ref(input_ids, weight, sources, segs, out=out,
                                    deepstack_out=deepstack_out)
    n, hidden = out.shape
    ds_cols = deepstack_out.shape[1] if deepstack_out is not None else 0
    interpreted = which == "interpreter"
    pool = table_pool(out.device, which)
    with pool.hold() as nested:
        if nested:  # a call inside another one-shot call on this thread: tables of its own
            tables = ResidentTables(out.device, max_requests=1, max_runs=max(len(segs), 1))
            ops = StepOps(tables, interpreted=interpreted)
        else:
            tables, ops = pool.fit(1, len(segs))
        op = ops.get(hidden=hidden, ds_cols=ds_cols, dtype=out.dtype, fused=weight is not None,
                     block_rows=block_rows, config=config)
        table = tables.staging_table()  # first: the step's pinned buffers are free once it returns
        tables.stage_runs(0, segment_runs(segs, sources, hidden))
        write_step_table(table, n, [0, 0, 0, len(segs)])
        tables.send_runs()
        tables.upload_step(1)
        op.launch(out, deepstack_out, input_ids, weight, n)
        tables.end_step(list(sources))
    return out
