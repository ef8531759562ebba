"""Launchers and the public device-layer ops: check inputs, choose a backend, launch once.

``gather_rows`` (scatter mode) writes segment rows into an existing buffer;
``embed_and_gather`` (fused mode) writes every output row in one pass: the token lookup
for text rows, segment rows for multimodal rows. Both read sources in place, with the
step kernel: the segments become the runs of one request that spans the output, sent up
with a one-request step table in one non-blocking copy (``mmkernels/layout.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmkernels import layout as L
from mmkernels.backend import _kernel_module, resolve_backend
from mmkernels.reference import assemble_step_ref, embed_and_gather_ref, gather_rows_ref
from mmkernels.segments import check_output, check_sources, check_segments
from mmkernels.step import (StepConfig, base_constexprs, fixed_args, grid_limits, launch_shape,
                            step_config)
from mmkernels.tables import anchor_addresses, anchors_on, source_entry

def segment_tables(segs: np.ndarray, sources: Sequence[torch.Tensor], hidden: int,
                   num_rows: int) -> np.ndarray:
    """The run rows of checked, sorted segments followed by a one-request step table.

    Segment ``(s, r, o, n)`` becomes the run ``[o, o + n)`` of one request whose window is
    the output's ``num_rows`` rows, reading ``sources[s]`` from row ``r``: one source entry
    per source (``source_entry``), then a fixed number of numpy operations on O(segments).
    """
    anchors = anchor_addresses(sources[0].device) if len(sources) else {}
    entries = np.array([source_entry(t, hidden, anchors) for t in sources],
                       np.int64).reshape(len(sources), L.SOURCE_FIELDS)
    runs = np.empty((len(segs), L.HOST_RUN_FIELDS), np.int64)
    runs[:, L.HOST_RUN_POS] = segs[:, 2]
    runs[:, L.HOST_RUN_END] = segs[:, 2] + segs[:, 3]
    runs[:, L.HOST_RUN_ROW], runs[:, L.HOST_RUN_ITEM] = segs[:, 1], segs[:, 0]
    step = np.zeros((L.step_rows(1), L.STEP_FIELDS), np.int64)
    step[0, L.STEP_TOKENS], step[0, L.STEP_REQUESTS] = num_rows, 1
    step[1, L.STEP_RUN_END] = len(segs)  # base 0, prefix 0, runs [0, s)
    step[2, L.STEP_BASE] = num_rows
    return step_tables(runs, step, entries)


def step_tables(runs: np.ndarray, step: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """Device run rows of host runs ``runs`` (``HOST_RUN_*``; item = index into
    ``entries``, the items' source entries) followed by the step table ``step``."""
    table = np.empty((len(runs) + len(step), L.RUN_FIELDS), np.int64)
    table[:len(runs)] = L.device_runs(runs, entries[runs[:, L.HOST_RUN_ITEM]])
    table[len(runs):] = step
    return table


@dataclass
class PreparedLaunch:
    """A launch whose host work is done and whose tables are on the device.

    ``run()`` only enqueues the kernel, so benchmarks can time (or graph-capture) the
    device work alone. The sources must stay alive until the kernel has run. The tables'
    copy was enqueued on the stream current at ``prepare_launch``: run on that stream, or
    synchronise first (a kernel on another stream may read the tables before they land).
    """

    kernel_args: tuple
    constexprs: dict
    grid: int
    sources: Sequence[torch.Tensor]
    tables: torch.Tensor

    def run(self) -> None:
        if self.grid:
            _kernel_module()._assemble_step_kernel[(self.grid,)](*self.kernel_args, **self.constexprs)


def prepare_launch(
    out: torch.Tensor,
    deepstack_out: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    table: np.ndarray,
    num_runs: int,
    input_ids: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    *,
    interpreted: bool = False,
    block_rows: int | None = None,
    config: StepConfig | None = None,
) -> PreparedLaunch:
    """Send the step kernel's tables up in one non-blocking copy from pinned memory and
    build its launch over ``out``'s rows.

    ``table`` is ``num_runs`` device run rows followed by a step table (``segment_tables``
    or ``step_tables``) whose runs read ``sources``; fused mode when ``weight`` is given.
    ``config`` (benchmarks' sweeps) overrides the heuristic and ``block_rows``.
    """
    fused = weight is not None
    n, hidden = out.shape
    ds_cols = deepstack_out.shape[1] if deepstack_out is not None else 0
    cfg = config or step_config(max(hidden, ds_cols), interpreted, block_rows)
    anchors = anchors_on(out.device)
    tables = torch.from_numpy(table)
    if out.is_cuda:
        # pinned through torch's caching host allocator: not reused before the copy is done
        tables = tables.pin_memory().to(out.device, non_blocking=True)
    limits = grid_limits(cfg, interpreted=interpreted, device=out.device,
                         heuristic=config is None and block_rows is None)
    rows, grid = launch_shape(cfg.block_rows, n, *limits)
    ds = deepstack_out if deepstack_out is not None else out
    vec = 16 // out.element_size()
    unit = vec if out.stride(0) % vec == 0 and ds.stride(0) % vec == 0 else 1
    args = (out, out.stride(0) // unit, ds, ds.stride(0) // unit,
            input_ids if fused else out, input_ids.stride(0) if fused else 0,
            *fixed_args(weight, tables, tables[num_runs:], anchors, hidden, ds_cols))
    constexprs = dict(base_constexprs(cfg, fused=fused, hidden=hidden, ds_cols=ds_cols,
                                      interpreted=interpreted),
                      OUT_UNIT=unit, BLOCK_R=rows, num_warps=cfg.num_warps)
    return PreparedLaunch(args, constexprs, grid, sources, tables)


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
    return run_checked(out, deepstack_out, sources, segs, backend=backend, block_rows=block_rows)


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
    return run_checked(out, deepstack_out, sources, segs, input_ids, weight, backend=backend,
                       block_rows=block_rows)


def run_checked(out: torch.Tensor, deepstack_out: torch.Tensor | None, sources: Sequence[torch.Tensor],
                segs: np.ndarray, input_ids: torch.Tensor | None = None,
                weight: torch.Tensor | None = None, *, backend: str = "auto",
                block_rows: int | None = None) -> torch.Tensor:
    """Run segments already checked and sorted by ``check_segments`` on the chosen
    backend; fused mode when ``weight`` is set (the public ops end here)."""
    which = resolve_backend(backend, out.device)
    if which == "torch":
        if weight is None:
            return gather_rows_ref(out, sources, segs, deepstack_out=deepstack_out)
        return embed_and_gather_ref(input_ids, weight, sources, segs, out=out,
                                    deepstack_out=deepstack_out)
    table = segment_tables(segs, sources, out.shape[1], out.shape[0])
    prepare_launch(out, deepstack_out, sources, table, len(segs), input_ids, weight,
                   interpreted=which == "interpreter", block_rows=block_rows).run()
    return out


def assemble_step(out: torch.Tensor, deepstack_out: torch.Tensor | None,
                  input_ids: torch.Tensor | None, weight: torch.Tensor | None, runs: np.ndarray,
                  step: np.ndarray, sources: Sequence[torch.Tensor | None], entries: np.ndarray, *,
                  backend: str = "auto", block_rows: int | None = None) -> torch.Tensor:
    """One step from host tables the caller has checked: host runs ``runs`` (item = index
    into ``sources`` and their source entries ``entries``) and the filled step table
    ``step`` over ``out``'s rows (``mmkernels/layout.py``); fused mode when ``weight``
    is set. The tables go up with the launch: the stateless path's one-shot step."""
    which = resolve_backend(backend, out.device)
    if which == "torch":
        return assemble_step_ref(out, deepstack_out, input_ids, weight, runs, step, sources)
    prepare_launch(out, deepstack_out, sources, step_tables(runs, step, entries), len(runs),
                   input_ids, weight, interpreted=which == "interpreter", block_rows=block_rows).run()
    return out
