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
from mmkernels.step import check_block_rows

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

    GPU: up to 2048-column blocks, 8 rows, 4 warps (an H100 sweep of 4-32 rows x 512-2048
    columns x 4/8 warps put every choice within 2% of it at hidden 3584 and 8192).
    Interpreter: one column block per row and 64 rows, since it pays per program.
    """
    check_block_rows(block_rows)
    width = max(hidden, deepstack_cols, 1)
    if interpreted:
        rows = block_rows or 64
        cols = min(triton_next_pow2(width), max(16, (1 << 20) // rows))
        return LaunchConfig(rows, cols, 1)
    cols = min(triton_next_pow2(width), 2048)
    return LaunchConfig(block_rows or 8, cols, 4)


def search_steps(num_segments: int) -> int:
    """Binary-search steps for ``num_segments``, rounded up to a multiple of 4 so that
    batches of similar size share one compiled kernel (extra steps are no-ops)."""
    need = max(1, math.ceil(math.log2(num_segments + 1)))
    return -(-need // 4) * 4


def triton_next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def source_info(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    """What the metadata needs of a source: address, row stride (elements), element size,
    kind code, columns. The host layer keeps these for sources it sees again."""
    return (t.data_ptr(), t.stride(0), t.element_size(), _KIND_CODE[t.dtype], t.shape[1])


def _source_info(sources: Sequence[torch.Tensor]) -> np.ndarray:
    """``[n, 5]`` int64 ``source_info`` of every source."""
    return np.array([source_info(t) for t in sources], dtype=np.int64).reshape(len(sources), 5)


@dataclass
class KernelPlan:
    """Everything a launch needs from the host: the table, anchors and flags."""

    meta: np.ndarray  # int64 [NUM_FIELDS, max(n, 1)]
    num_segments: int
    num_tiles: int
    anchors: dict  # kind code -> the source tensor whose address is that kind's anchor
    kinds: set
    aligned: bool


SMALL_SEGMENTS = 32  # up to this many segments, plain Python beats numpy's fixed costs


def build_plan(
    segs: np.ndarray, sources: Sequence[torch.Tensor], block_rows: int, hidden: int,
    num_out_rows: int | None = None, *, small: int = SMALL_SEGMENTS,
    info: np.ndarray | None = None,
) -> KernelPlan:
    """The kernel's metadata from checked, sorted segments (see ``_build_plan_numpy``).

    Small tables are built in plain Python, large ones with numpy; both give the same
    table (a property test holds them to it), ``small`` picks the crossover. ``info``
    is the sources' ``[n, 5]`` ``source_info`` when the caller already has it.
    """
    if len(segs) <= small:
        return _build_plan_python(segs, sources, block_rows, hidden, num_out_rows, info)
    if info is None:
        info = _source_info(sources)
    return _build_plan_numpy(segs, sources, block_rows, hidden, num_out_rows, info)


def _build_plan_python(segs, sources, block_rows, hidden, num_out_rows, info=None) -> KernelPlan:
    """``_build_plan_numpy`` for a few segments, one Python pass and one array at the end."""
    k = _kernel_module()
    text = int(k.KIND_TEXT)
    rows_info = info.tolist() if info is not None else [source_info(t) for t in sources]
    anchors, anchor_addr, table_src = {}, {}, []
    for t, (addr, stride, esize, kind, ncols) in zip(sources, rows_info):
        if kind not in anchors:
            anchors[kind], anchor_addr[kind] = t, addr
        delta = addr - anchor_addr[kind]
        if delta % esize:
            raise ValueError("Invalid sources: a source address is not aligned to its element size")
        table_src.append((delta // esize, stride, esize, kind, ncols))
    fused = num_out_rows is not None
    table, end = [], 0  # entries: (out row, rows, offset, stride, kind, cols, element size)
    for src, src_row, out_row, rows in segs.tolist():
        off, stride, esize, kind, cols = table_src[src]
        if fused and out_row > end:
            table.append((end, out_row - end, 0, 0, text, 0, 16))
        table.append((out_row, rows, off + src_row * stride, stride, kind, cols, esize))
        end = out_row + rows
    if fused and num_out_rows > end:
        table.append((end, num_out_rows - end, 0, 0, text, 0, 16))
    aligned = (hidden % 8 == 0 and all(a % 16 == 0 for a in anchor_addr.values())
               and all(e[2] % (16 // e[6]) == 0 and e[3] % (16 // e[6]) == 0 for e in table))
    cols, tile = [], 0
    for out_row, rows, off, stride, kind, ncols, esize in table:
        if aligned:
            off, stride = off // (16 // esize), stride // (16 // esize)
        cols.append((tile, out_row, rows, off, stride, kind, ncols))
        tile += -(-rows // block_rows)
    meta = np.zeros((int(k.NUM_FIELDS), max(len(cols), 1)), dtype=np.int64)
    if cols:
        meta[:, :len(cols)] = np.array(cols, dtype=np.int64).T
    present = set(anchors) | ({text} if fused else set())
    return KernelPlan(meta, len(cols), tile, anchors, present, aligned)


def _build_plan_numpy(
    segs: np.ndarray, sources: Sequence[torch.Tensor], block_rows: int, hidden: int,
    num_out_rows: int | None, info: np.ndarray,
) -> KernelPlan:
    """Build the kernel's metadata from checked, sorted segments.

    With ``num_out_rows`` (fused mode) the output rows between segments become text
    segments, so the tiles cover the output. Each source is addressed in elements from an
    *anchor*: the first source of its dtype. A fixed number of numpy operations on
    O(segments) data; nothing grows with tokens.
    """
    k = _kernel_module()
    text = int(k.KIND_TEXT)
    kinds, first = np.unique(info[:, 3], return_index=True)
    anchors = {c: sources[i] for c, i in zip(kinds.tolist(), first.tolist())}
    anchor_addr = np.zeros(text + 1, np.int64)
    anchor_addr[kinds] = info[first, 0]
    # element offset of each source from its anchor (allocations are element-aligned)
    delta = info[:, 0] - anchor_addr[info[:, 3]]
    if (delta % info[:, 2]).any():
        raise ValueError("Invalid sources: a source address is not aligned to its element size")

    s = len(segs)
    per = info[segs[:, 0]]
    # rows: OUT_ROW, ROWS, SRC_OFF, SRC_STRIDE, SRC_KIND, SRC_COLS, element size
    fields = np.stack((segs[:, 2], segs[:, 3], delta[segs[:, 0]] // per[:, 2] + segs[:, 1] * per[:, 1],
                       per[:, 1], per[:, 3], per[:, 4], per[:, 2]))
    if num_out_rows is None:
        table = fields
    else:  # interleave: gap 0, segment 0, gap 1, ..., segment S-1, gap S; drop empty gaps
        table = np.zeros((7, 2 * s + 1), np.int64)
        table[:, 1::2] = fields
        table[0, 2::2] = segs[:, 2] + segs[:, 3]
        table[1, 0::2] = np.append(segs[:, 2], num_out_rows) - table[0, 0::2]
        table[4, 0::2] = text
        table[6, 0::2] = 16
        table = table[:, table[1] > 0]
    # 16-byte alignment of every row the kernel reads: offsets and strides then travel in
    # units of 16 bytes' worth of elements, which lets the compiler vectorise the loads.
    vec = 16 // table[6]
    aligned = bool(hidden % 8 == 0  # deepstack columns start at column hidden
                   and not (anchor_addr[kinds] % 16).any()
                   and not ((table[2] % vec) | (table[3] % vec)).any())
    if aligned:
        table[2:4] //= vec
    n = table.shape[1]
    tiles = -(-table[1] // block_rows)
    meta = np.zeros((int(k.NUM_FIELDS), max(n, 1)), dtype=np.int64)
    meta[k.TILE_START, :n] = np.cumsum(tiles) - tiles
    meta[k.OUT_ROW:k.SRC_COLS + 1, :n] = table[:6]
    # a kind flagged but unused only compiles a branch that never runs: no need to scan
    present = set(anchors) | ({text} if num_out_rows is not None else set())
    return KernelPlan(meta, n, int(tiles.sum()), anchors, present, aligned)


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
    block_rows: int | None = None,
    config: LaunchConfig | None = None,
    info: np.ndarray | None = None,
) -> PreparedLaunch:
    """Build the metadata and send it up in one non-blocking copy from pinned memory.

    ``segs`` must come from ``prepare_segments``; fused mode when ``weight`` is given.
    ``config`` (benchmarks' sweeps) overrides the heuristic and ``block_rows``.
    """
    import triton

    k = _kernel_module()
    fused = weight is not None
    hidden = out.shape[1]
    ds_cols = deepstack_out.shape[1] if deepstack_out is not None else 0
    cfg = config or launch_config(hidden, ds_cols, interpreted, block_rows)
    plan = build_plan(segs, sources, cfg.block_rows, hidden, out.shape[0] if fused else None,
                      info=info)
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
        meta, plan.num_segments, plan.num_segments, meta,
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
    validate: bool = True,
    info: np.ndarray | None = None,
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
    validate : bool
        check sources and segments (default). The host layer passes False: it has
        checked the same things itself and hands over segments sorted by output row.
    info : numpy.ndarray, optional
        shape ``[len(sources), 5]``: each source's ``source_info``, when the caller keeps
        it (reading it off many tensors is most of the host time of a large batch).

    Example
    -------
    >>> out = torch.zeros(4, 2)
    >>> gather_rows(out, [torch.ones(3, 2)], [(0, 1, 2, 2)], backend="torch")[:, 0]
    tensor([0., 0., 1., 1.])
    """
    if torch.compiler.is_compiling():  # compiled callers get the custom op; eager skips the dispatcher
        torch.ops.mmkernels.gather_rows(out, list(sources), segments, deepstack_out, backend, block_rows)
        return out
    if validate:
        check_output("out", out)
        ds_cols = _check_deepstack(deepstack_out, out)
        check_sources(sources, out.device, out.shape[1], ds_cols)
        segs = prepare_segments(segments, sources, out.shape[0])
    else:
        segs = segments
    return _run(resolve_backend(backend, out.device), out, deepstack_out, sources, segs, None, None,
                block_rows, info)


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
    validate: bool = True,
    info: np.ndarray | None = None,
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
    if not validate:
        if out is None:
            out = torch.empty((n, hidden), dtype=weight.dtype, device=weight.device)
        return _run(resolve_backend(backend, out.device), out, deepstack_out, sources, segments,
                    input_ids, weight, block_rows, info)
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
    segs = prepare_segments(segments, sources, n)
    return _run(resolve_backend(backend, out.device), out, deepstack_out, sources, segs, input_ids,
                weight, block_rows, info)


def _run(which, out, deepstack_out, sources, segs, input_ids, weight, block_rows,
         info=None) -> torch.Tensor:
    """Run checked, sorted segments on the chosen backend; fused mode when ``weight`` is set."""
    if which == "torch":
        if weight is None:
            return gather_rows_ref(out, sources, segs, deepstack_out=deepstack_out)
        return embed_and_gather_ref(input_ids, weight, sources, segs, out=out,
                                    deepstack_out=deepstack_out)
    if input_ids is not None and input_ids.shape[0] > 1 and input_ids.stride(0) != 1:
        input_ids = input_ids.contiguous()  # the segment kernel reads ids at unit stride
    prepare_launch(out, deepstack_out, sources, segs, input_ids, weight,
                   interpreted=which == "interpreter", block_rows=block_rows, info=info).run()
    return out
