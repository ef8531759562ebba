"""Launchers and the public device-layer ops: check inputs, choose a backend, launch once.

``gather_rows`` (scatter mode) writes segment rows into an existing buffer;
``embed_and_gather`` (fused mode) writes every output row in one pass: the token lookup
for text rows, segment rows for multimodal rows. Both read sources in place, with the
step kernel: the segments become the runs of one request that spans the output, sent up
with a one-request step table in one non-blocking copy (``mmkernels/layout.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
import threading

import numpy as np
import torch

from mmkernels import layout as L
from mmkernels.backend import resolve_backend
from mmkernels.reference import embed_and_gather_ref, gather_rows_ref
from mmkernels.segments import check_output, check_sources, check_segments
from mmkernels.step_op import StepConfig, StepOp, StepOps
from mmkernels.tables import ResidentTables, anchor_addresses, source_entry

class StepPool:
    """Tables and step ops of one-shot steps on one device and stream: each call writes its
    runs from row 0, fills a step table and launches (``launch_runs``), so one-shot
    callers share the upload path and launcher of the resident ``Assembler``. Capacities
    grow by doubling; a lock serialises callers."""

    def __init__(self, device: torch.device):
        self.device = device
        self.lock = threading.Lock()
        self.tables: ResidentTables | None = None
        self._ops: dict = {}  # interpreted -> StepOps over the current tables

    def ensure(self, requests: int, runs: int) -> ResidentTables:
        """Tables with room for ``requests`` requests and ``runs`` runs (rebuilt, at the
        next powers of two, when short)."""
        t = self.tables
        if t is None or t.max_requests < requests or t.max_runs < runs:
            r = _pow2(max(requests, 1 if t is None else t.max_requests))
            k = _pow2(max(runs, 64 if t is None else t.max_runs))
            self.tables = t = ResidentTables(self.device, max_requests=r, max_runs=k)
            self._ops = {}
        return t

    def op(self, *, hidden: int, ds_cols: int, dtype: torch.dtype, fused: bool, interpreted: bool,
           block_rows: int | None, config: StepConfig | None = None) -> StepOp:
        ops = self._ops.get(interpreted)
        if ops is None:
            ops = self._ops[interpreted] = StepOps(self.tables, interpreted=interpreted)
        return ops.get(hidden=hidden, ds_cols=ds_cols, dtype=dtype, fused=fused, block_rows=block_rows,
                       config=config)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_pools: dict = {}
_pools_lock = threading.Lock()


def step_pool(device: torch.device) -> StepPool:
    """The one-shot step pool of ``device`` and its current stream (a stream of its own, so
    a call on another stream never rewrites tables a queued kernel still reads)."""
    stream = torch._C._cuda_getCurrentRawStream(device.index or 0) if device.type == "cuda" else 0
    key = (device, stream)
    pool = _pools.get(key)
    if pool is None:
        with _pools_lock:
            pool = _pools.setdefault(key, StepPool(device))
    return pool


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
    through the device's ``StepPool``."""
    which = resolve_backend(backend, out.device)
    if which == "torch":
        if weight is None:
            return gather_rows_ref(out, sources, segs, deepstack_out=deepstack_out)
        return embed_and_gather_ref(input_ids, weight, sources, segs, out=out,
                                    deepstack_out=deepstack_out)
    n, hidden = out.shape
    ds_cols = deepstack_out.shape[1] if deepstack_out is not None else 0
    pool = step_pool(out.device)
    with pool.lock:
        tables = pool.ensure(1, len(segs))
        op = pool.op(hidden=hidden, ds_cols=ds_cols, dtype=out.dtype, fused=weight is not None,
                     interpreted=which == "interpreter", block_rows=block_rows, config=config)
        table = tables.staging_table()  # first: the step's pinned buffers are free once it returns
        tables.write_runs(np.arange(len(segs)), segment_runs(segs, sources, hidden))
        table[0, L.STEP_TOKENS], table[0, L.STEP_REQUESTS] = n, 1
        table[1] = 0  # base 0, prefix 0, runs [0, s)
        table[1, L.STEP_RUN_END] = len(segs)
        table[2, L.STEP_BASE] = n
        tables.upload_step(1)
        op.launch(out, deepstack_out, input_ids, weight, n)
        tables.end_step(list(sources))
    return out
