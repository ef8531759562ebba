"""Launchers and the public device-layer ops: check inputs, choose a backend, launch once.

``gather_rows`` (scatter mode) writes segment rows into an existing buffer;
``embed_and_gather`` (fused mode) writes every output row in one pass: the token lookup
for text rows, segment rows for multimodal rows. Both read sources in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmkernels.backend import _kernel_module, resolve_backend
from mmkernels.reference import embed_and_gather_ref, gather_rows_ref
from mmkernels.segments import check_output, check_sources, prepare_segments

_KIND_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the kernel's KIND_*


@dataclass(frozen=True)
class LaunchConfig:
    """Block shape and warps of one launch."""

    block_rows: int
    block_cols: int
    num_warps: int


def launch_config(
    hidden: int, deepstack_cols: int, interpreted: bool, block_rows: int | None = None
) -> LaunchConfig:
    """Pick the block shape for a hidden size (one heuristic for every launch).

    GPU: 1024-column blocks (16-byte vectors over 4 warps for 2-byte dtypes), 8 rows.
    Interpreter: one column block per row and 64 rows, since it pays per program.
    """
    width = max(hidden, deepstack_cols, 1)
    if interpreted:
        rows = block_rows or 64
        cols = min(triton_next_pow2(width), max(16, (1 << 20) // rows))
        return LaunchConfig(rows, cols, 1)
    cols = min(triton_next_pow2(width), 1024)
    return LaunchConfig(block_rows or 8, cols, 4)


def search_steps(num_segments: int) -> int:
    """Binary-search steps for ``num_segments``, rounded up to a multiple of 4 so that
    batches of similar size share one compiled kernel (extra steps are no-ops)."""
    need = max(1, math.ceil(math.log2(num_segments + 1)))
    return -(-need // 4) * 4


def triton_next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def _source_table(sources: Sequence[torch.Tensor]):
    """Per-source address, row stride (elements), element size, kind code, columns."""
    n = len(sources)
    addr = np.fromiter((t.data_ptr() for t in sources), np.int64, n)
    stride = np.fromiter((t.stride(0) for t in sources), np.int64, n)
    esize = np.fromiter((t.element_size() for t in sources), np.int64, n)
    kind = np.fromiter((_KIND_CODE[t.dtype] for t in sources), np.int64, n)
    cols = np.fromiter((t.shape[1] for t in sources), np.int64, n)
    return addr, stride, esize, kind, cols


def text_gaps(segs: np.ndarray, num_out_rows: int) -> np.ndarray:
    """The ``[G, 2]`` (first row, rows) runs of output rows that no segment covers."""
    starts = np.concatenate(([0], segs[:, 2] + segs[:, 3]))
    ends = np.concatenate((segs[:, 2], [num_out_rows]))
    keep = ends > starts
    return np.stack((starts[keep], (ends - starts)[keep]), axis=1)


@dataclass
class KernelPlan:
    """Everything a launch needs from the host: the table, anchors and flags."""

    meta: np.ndarray  # int64 [NUM_FIELDS, max(n, 1)]
    num_segments: int
    num_tiles: int
    anchors: dict  # kind code -> the source tensor whose address is that kind's anchor
    kinds: set
    aligned: bool


def build_plan(
    segs: np.ndarray, sources: Sequence[torch.Tensor], block_rows: int, hidden: int,
    num_out_rows: int | None = None,
) -> KernelPlan:
    """Build the kernel's metadata from checked, sorted segments.

    With ``num_out_rows`` (fused mode) the uncovered output rows become text segments, so
    the tiles cover the output. Each source is addressed in elements from an *anchor*:
    the first source of its dtype. O(segments) numpy work; nothing grows with tokens.
    """
    k = _kernel_module()
    text = int(k.KIND_TEXT)
    addr, stride, esize, kind, cols = _source_table(sources)
    anchors, anchor_addr = {}, np.zeros(text + 1, np.int64)
    for i, t in enumerate(sources):
        if int(kind[i]) not in anchors:
            anchors[int(kind[i])] = t
            anchor_addr[kind[i]] = addr[i]
    # element offset of each source from its anchor (allocations are element-aligned)
    delta = addr - anchor_addr[kind]
    if (delta % esize).any():
        raise ValueError("Invalid sources: a source address is not aligned to its element size")
    src_off = delta // esize

    src, src_row, out_row, rows = segs.T
    f_out, f_rows = out_row, rows
    f_off = src_off[src] + src_row * stride[src]
    f_stride, f_kind, f_cols, f_esize = stride[src], kind[src], cols[src], esize[src]
    if num_out_rows is not None:
        gaps = text_gaps(segs, num_out_rows)
        zeros = np.zeros(len(gaps), np.int64)
        f_out = np.concatenate((f_out, gaps[:, 0]))
        f_rows = np.concatenate((f_rows, gaps[:, 1]))
        f_off = np.concatenate((f_off, zeros))
        f_stride = np.concatenate((f_stride, zeros))
        f_kind = np.concatenate((f_kind, zeros + text))
        f_cols = np.concatenate((f_cols, zeros))
        f_esize = np.concatenate((f_esize, zeros + 16))
        order = np.argsort(f_out, kind="stable")
        f_out, f_rows, f_off, f_stride, f_kind, f_cols, f_esize = (
            a[order] for a in (f_out, f_rows, f_off, f_stride, f_kind, f_cols, f_esize))

    # 16-byte alignment of every row the kernel reads: offsets and strides then travel in
    # units of 16 bytes' worth of elements, which lets the compiler vectorise the loads.
    vec = 16 // f_esize
    aligned = bool(
        hidden % 8 == 0  # deepstack columns start at column hidden
        and (anchor_addr[list(anchors)] % 16 == 0).all()
        and (f_off % vec == 0).all() and (f_stride % vec == 0).all()
    )
    if aligned:
        f_off, f_stride = f_off // vec, f_stride // vec

    n = len(f_rows)
    tiles = -(-f_rows // block_rows)
    meta = np.zeros((int(k.NUM_FIELDS), max(n, 1)), dtype=np.int64)
    meta[k.TILE_START, :n] = np.cumsum(tiles) - tiles
    meta[k.OUT_ROW, :n] = f_out
    meta[k.ROWS, :n] = f_rows
    meta[k.SRC_OFF, :n] = f_off
    meta[k.SRC_STRIDE, :n] = f_stride
    meta[k.SRC_KIND, :n] = f_kind
    meta[k.SRC_COLS, :n] = f_cols
    return KernelPlan(meta, n, int(tiles.sum()), anchors, set(np.unique(f_kind).tolist()), aligned)


@dataclass
class PreparedLaunch:
    """A launch whose host work is done and whose metadata is on the device.

    ``run()`` only enqueues the kernel, so benchmarks can time (or graph-capture) the
    device work alone. The sources must stay alive until the kernel has run.
    """

    kernel_args: tuple
    constexprs: dict
    grid: tuple
    sources: Sequence[torch.Tensor]
    meta: torch.Tensor

    def run(self) -> None:
        if self.grid[0]:
            _kernel_module()._assemble_kernel[self.grid](*self.kernel_args, **self.constexprs)


def prepare_launch(
    out: torch.Tensor,
    deepstack_out: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    segs: np.ndarray,
    input_ids: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    *,
    interpreted: bool = False,
    config: LaunchConfig | None = None,
) -> PreparedLaunch:
    """Build the metadata and send it up in one non-blocking copy from pinned memory.

    ``segs`` must come from ``prepare_segments``; fused mode when ``weight`` is given.
    """
    import triton

    k = _kernel_module()
    fused = weight is not None
    hidden = out.shape[1]
    ds_cols = deepstack_out.shape[1] if deepstack_out is not None else 0
    cfg = config or launch_config(hidden, ds_cols, interpreted)
    plan = build_plan(segs, sources, cfg.block_rows, hidden, out.shape[0] if fused else None)
    meta = torch.from_numpy(plan.meta)
    if out.is_cuda:
        meta = meta.pin_memory().to(out.device, non_blocking=True)
    main_blocks = triton.cdiv(hidden, cfg.block_cols)
    grid = (plan.num_tiles, main_blocks + triton.cdiv(ds_cols, cfg.block_cols))
    ds = deepstack_out if deepstack_out is not None else out
    anchor = [plan.anchors.get(int(c), out) for c in (k.KIND_F32, k.KIND_F16, k.KIND_BF16)]
    args = (
        out, out.stride(0),
        ds, ds.stride(0),
        input_ids if fused else out, weight if fused else out,
        weight.stride(0) if fused else 0, weight.shape[0] if fused else 0,
        *anchor,
        meta, plan.num_segments,
        hidden, ds_cols, main_blocks,
    )
    constexprs = dict(
        HAS_DS=ds_cols > 0,
        BLOCK_R=cfg.block_rows,
        BLOCK_H=cfg.block_cols,
        SEARCH_STEPS=search_steps(plan.num_segments),
        HAS_TEXT=int(k.KIND_TEXT) in plan.kinds,
        HAS_F32=int(k.KIND_F32) in plan.kinds,
        HAS_F16=int(k.KIND_F16) in plan.kinds,
        HAS_BF16=int(k.KIND_BF16) in plan.kinds,
        ALIGNED=plan.aligned,
        EMULATE_BF16_RNE=interpreted,
        num_warps=cfg.num_warps,
    )
    return PreparedLaunch(args, constexprs, grid, sources, meta)


def _launch(out, deepstack_out, sources, segs, input_ids, weight, interpreted, block_rows) -> None:
    """Prepare and run one launch (the path every public op takes)."""
    hidden = out.shape[1]
    ds_cols = deepstack_out.shape[1] if deepstack_out is not None else 0
    cfg = launch_config(hidden, ds_cols, interpreted, block_rows)
    prepare_launch(out, deepstack_out, sources, segs, input_ids, weight, interpreted=interpreted,
                   config=cfg).run()


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
    check_output("out", out)
    ds_cols = _check_deepstack(deepstack_out, out)
    check_sources(sources, out.device, out.shape[1], ds_cols)
    segs = prepare_segments(segments, sources, out.shape[0])
    which = resolve_backend(backend, out.device)
    if which == "torch":
        return gather_rows_ref(out, sources, segs, deepstack_out=deepstack_out)
    _launch(out, deepstack_out, sources, segs, None, None, which == "interpreter", block_rows)
    return out


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
    if input_ids.dim() != 1 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"Invalid input_ids: expected a 1-D int32/int64 tensor, got "
                         f"{input_ids.dtype} of shape {list(input_ids.shape)}")
    check_output("weight", weight)
    if weight.shape[0] == 0:
        raise ValueError("Invalid shape of weight: expected at least one vocabulary row, got 0")
    n, hidden = input_ids.shape[0], weight.shape[1]
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
    segs = prepare_segments(segments, sources, n)
    which = resolve_backend(backend, out.device)
    if which == "torch":
        return embed_and_gather_ref(input_ids, weight, sources, segs, out=out,
                                    deepstack_out=deepstack_out)
    _launch(out, deepstack_out, sources, segs, input_ids, weight, which == "interpreter", block_rows)
    return out
