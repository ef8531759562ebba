"""The step op: assemble one prefill step from resident tables, on the chosen backend.

``StepOp`` binds what stays fixed for an output width (tables, anchors, widths, block
shape) and builds the kernel's argument list once; a call patches only what changes
(output, deepstack, id and weight buffers) and launches on ``cdiv(rows, BLOCK_R)``
programs, directly (``DirectLauncher``); ``StepGraph`` captures the step's copy and
launch at capacity and replays them. Every path that runs the kernel launches here: the
``Assembler``, the stateless ``assemble`` and the segment ops. The torch backend runs the
twin ``mmkernels.reference.assemble_step_ref`` on the host mirrors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmkernels.launch import DirectLauncher
from mmkernels.tables import STAGING_RING, ResidentTables
from mmkernels import layout as L

MAX_BLOCK_COLS = 1024
ONE_BLOCK_MAX_COLS = 4096  # a row of up to this many columns that 1024 does not divide: one block
INTERPRETER_PROGRAMS = 3  # the interpreter's grid cap: spans of several pieces get tested


@dataclass(frozen=True)
class StepConfig:
    """Block shape and warps of the step kernel (``step_config`` picks them)."""

    block_rows: int
    block_cols: int
    num_warps: int
    programs_per_sm: int = 0  # a cap on the grid per SM (programs then stream longer spans); 0: none
    search_keys: int = 16  # keys a search loads per round (power of two, >= 2)


def check_block_rows(block_rows) -> None:
    """``block_rows`` (a test and benchmark knob): ``None`` or a power of two in [1, 128]."""
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int)
                                   or block_rows < 1 or block_rows > 128
                                   or block_rows & (block_rows - 1)):
        raise ValueError(f"Invalid block_rows: expected a power of two in [1, 128], got {block_rows!r}")


def step_config(width: int, interpreted: bool, block_rows: int | None = None) -> StepConfig:
    """The block shape for rows of ``width`` columns (the widest of hidden and deepstack).

    GPU: up to 1024 columns and about 4096 elements per block (4 rows at 1024 columns), 4
    warps, one program per ``block_rows`` rows; the kernel loads two column blocks before
    storing them, so 2048 columns are in flight. In H100 sweeps (``python -m
    bench.bench_resident --sweep``, ``bench/data/h100_step_sweep_paired.json``: 1-8 rows x
    1024-8192 columns x 4/8 warps) this was first or within 1.4% of first on six of eight
    scenarios (at hidden 8192, 2 x 4096 was 3% faster; 256 rows in all prefer 1-2 rows a
    program) and 0.1-2% faster than the unpaired 4 x 2048 blocks on each. A width over
    1024 and up to 4096 that 1024 does not divide takes one block of the next power of two
    and 8192 elements (2 x 4096 at 3584: ``bench/data/h100_step_sweep_h3584.json``, 0.5-1%
    faster than 4 x 1024 on two of three scenarios at that width, 0.4% slower on the
    third; a ``block_rows`` knob that would pass 8192 elements keeps 1024 columns).
    ``StepOp`` halves the rows for steps too small to give every SM a program.
    Interpreter: 64 rows, one column block and a grid of 3 programs, so each program
    streams several pieces and segments. ``block_rows`` (tests) must be a power of two
    from 1 to 128.
    """
    check_block_rows(block_rows)
    cols = 1 << (max(width, 16) - 1).bit_length()
    if interpreted:
        return StepConfig(block_rows or 64, cols, 1, programs_per_sm=0)
    if (MAX_BLOCK_COLS < cols <= ONE_BLOCK_MAX_COLS and width % MAX_BLOCK_COLS
            and (block_rows or 1) * cols <= 8192):
        return StepConfig(block_rows or 8192 // cols, cols, 4)
    cols = min(cols, MAX_BLOCK_COLS)
    return StepConfig(block_rows or min(64, max(4, 4096 // cols)), cols, 4)


def block_rows_for(block_rows: int, rows: int, fill_programs: int) -> int:
    """``block_rows``, halved while a launch over ``rows`` rows would have fewer than
    ``fill_programs`` programs (the SM count: a small step then gives every SM one)."""
    while block_rows > 1 and -(-rows // block_rows) < fill_programs:
        block_rows //= 2
    return block_rows


def table_args(runs: torch.Tensor, step: torch.Tensor, anchors, hidden: int, ds_cols: int) -> tuple:
    """The kernel's arguments after the nine that change per call (output, deepstack, id
    and weight buffers with their strides), in its order."""
    return (*anchors, runs, step, hidden, ds_cols)


def base_constexprs(cfg: StepConfig, *, fused: bool, hidden: int, ds_cols: int,
                    interpreted: bool) -> dict:
    """The kernel's constexprs for ``cfg``, before a launch sets ``OUT_UNIT`` and ``BLOCK_R``."""
    if cfg.search_keys > L.MIN_REQUEST_ROWS:
        raise ValueError(f"search_keys {cfg.search_keys} > {L.MIN_REQUEST_ROWS} "
                         "(the step table's minimum request rows)")
    return dict(FUSED=fused, HAS_DS=ds_cols > 0, MAIN_BLOCKS=-(-hidden // cfg.block_cols),
                DS_BLOCKS=-(-ds_cols // cfg.block_cols), BLOCK_R=cfg.block_rows,
                BLOCK_H=cfg.block_cols, OUT_UNIT=1, SEARCH_W=cfg.search_keys,
                EMULATE_BF16_RNE=interpreted)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached by torch)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def grid_limits(cfg: StepConfig, *, interpreted: bool, device: torch.device,
                heuristic: bool) -> tuple[int, int]:
    """``(max_programs, fill_programs)`` of launches with ``cfg``: the grid cap (the
    interpreter's, or ``programs_per_sm``), and the programs a small launch halves its
    rows to reach (the SM count, for the heuristic's shape only; 0: never)."""
    if interpreted:
        return INTERPRETER_PROGRAMS, 0
    sms = sm_count(device)
    return (sms * cfg.programs_per_sm if cfg.programs_per_sm else 1 << 30), (sms if heuristic else 0)


def launch_shape(block_rows: int, rows: int, max_programs: int, fill_programs: int) -> tuple[int, int]:
    """``(rows a program copies at a time, programs)`` of a launch over ``rows`` rows."""
    if rows < block_rows * fill_programs:
        block_rows = block_rows_for(block_rows, rows, fill_programs)
    return block_rows, min(-(-rows // block_rows), max_programs)


class StepOp:
    """The step kernel over ``tables`` for one output width (fused mode when ``fused``).

    ``config`` (benchmark sweeps) overrides the heuristic's block shape. The per-call
    buffers (output, deepstack, ids, weight) are passed to ``launch``; the tables, anchors
    and widths are bound here, so a launch packs a fixed argument tuple.
    """

    def __init__(self, tables: ResidentTables, *, hidden: int, ds_cols: int, dtype: torch.dtype,
                 fused: bool, interpreted: bool, block_rows: int | None = None,
                 config: StepConfig | None = None):
        from mmkernels.backend import _kernel_module

        self.kernel_module = _kernel_module("step")
        self.tables, self.fused = tables, fused
        self.cfg = config or step_config(max(hidden, ds_cols), interpreted, block_rows)
        self.vec = 16 // torch.empty((), dtype=dtype).element_size()
        self.launcher = DirectLauncher(self.kernel_module._assemble_step_kernel,
                                       interpreted=interpreted)
        anchors = [tables.anchors[k] for k in (L.KIND_F32, L.KIND_F16, L.KIND_BF16)]
        self._fixed = table_args(tables.runs, tables.step, anchors, hidden, ds_cols)
        self._fixed_ints = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in self._fixed)
        self._base = base_constexprs(self.cfg, fused=fused, hidden=hidden, ds_cols=ds_cols,
                                     interpreted=interpreted)
        self._variants: dict = {}  # (OUT_UNIT, BLOCK_R) -> (constexprs, int arguments after the head)
        self.device_index = (tables.device.index or 0) if tables.device.type == "cuda" else 0
        # a step too small to give every SM a program takes fewer rows a program (H100:
        # 1x1x256 ran in 2.9 us at 2 rows against 3.3 at 4), for the heuristic's shape
        self.max_programs, self.fill_programs = grid_limits(
            self.cfg, interpreted=interpreted, device=tables.device,
            heuristic=config is None and block_rows is None)

    def _variant(self, unit: int, br: int) -> tuple[dict, tuple]:
        constexprs = dict(self._base, OUT_UNIT=unit, BLOCK_R=br)
        v = self._variants[unit, br] = (constexprs, self._fixed_ints + tuple(constexprs.values()))
        return v

    def launch(self, out: torch.Tensor, deepstack_out: torch.Tensor | None,
               input_ids: torch.Tensor | None, weight: torch.Tensor | None, rows: int) -> None:
        """Enqueue the kernel over ``rows`` output rows (the step's tokens, or capacity).

        The step table must already be on the device; nothing here reads it back.
        ``weight`` (fused mode) is the token-embedding table ``[vocab, hidden]``.
        """
        br, grid = launch_shape(self.cfg.block_rows, rows, self.max_programs, self.fill_programs)
        if grid:
            self._launch(out, deepstack_out, input_ids, weight, br, grid)

    def _launch(self, out, deepstack_out, input_ids, weight, br: int, grid: int) -> None:
        ds = out if deepstack_out is None else deepstack_out
        ids = out if input_ids is None else input_ids
        w = out if weight is None else weight  # scatter mode: any valid pointer stands in
        out_stride, ds_stride = out.stride(0), ds.stride(0)
        ids_stride = 0 if input_ids is None else input_ids.stride(0)
        w_stride, vocab = (0, 0) if weight is None else (weight.stride(0), weight.shape[0])
        vec = self.vec
        unit = vec if out_stride % vec == 0 and ds_stride % vec == 0 else 1
        o, d, i, wp = out.data_ptr(), ds.data_ptr(), ids.data_ptr(), w.data_ptr()
        # what Triton specialises on among the per-call arguments
        key = (unit, br, o % 16 == 0, d % 16 == 0, i % 16 == 0, wp % 16 == 0, ids.dtype, w.dtype,
               w_stride % 16 == 0, w_stride == 1, (out_stride | ds_stride | ids_stride | w_stride) >> 31)
        head = (o, out_stride // unit, d, ds_stride // unit, i, ids_stride, wp, w_stride, vocab)
        constexprs, tail = self._variants.get((unit, br)) or self._variant(unit, br)
        if not self.launcher.launch_direct(key, grid, head + tail, self.device_index):
            args = (out, out_stride // unit, ds, ds_stride // unit, ids, ids_stride, w, w_stride,
                    vocab) + self._fixed
            self.launcher.launch(key, grid, args, constexprs, self.cfg.num_warps)

    def warm(self, out: torch.Tensor, deepstack_out: torch.Tensor | None, input_ids: torch.Tensor | None,
             weight: torch.Tensor | None) -> None:
        """Compile every block shape a launch over buffers like these may pick (each row
        count a step can have), so no step after construction pays a compile. Sets the
        device step table to a step of no tokens (call before any step is queued)."""
        self.tables.step[0, :2] = 0
        br = self.cfg.block_rows
        while True:
            self._launch(out, deepstack_out, input_ids, weight, br, 1)
            if br == 1 or not self.fill_programs:
                break
            br //= 2


class StepOps:
    """The step ops of one set of tables, one per output width, mode and block shape, made
    on first use (a model's steps, or one-shot calls of several widths, share them)."""

    def __init__(self, tables: ResidentTables, *, interpreted: bool):
        self.tables, self.interpreted = tables, interpreted
        self._ops: dict = {}

    def get(self, *, hidden: int, ds_cols: int, dtype: torch.dtype, fused: bool,
            block_rows: int | None = None, config: StepConfig | None = None) -> StepOp:
        key = (hidden, ds_cols, dtype, fused, block_rows, config)
        op = self._ops.get(key)
        if op is None:
            op = self._ops[key] = StepOp(self.tables, hidden=hidden, ds_cols=ds_cols, dtype=dtype, fused=fused,
                                         interpreted=self.interpreted, block_rows=block_rows, config=config)
        return op


class StepGraph:
    """A step's device work (step-table copy + kernel at capacity) captured once per
    staging buffer of ``op``'s tables and replayed: outputs live in the persistent buffers
    given here. Counts are read on the device, so a replay serves any step that fits."""

    def __init__(self, op: StepOp, out: torch.Tensor, deepstack_out: torch.Tensor | None,
                 input_ids: torch.Tensor, weight: torch.Tensor | None, capacity: int):
        self.op, self.out, self.deepstack_out = op, out, deepstack_out
        self.input_ids, self.weight, self.capacity = input_ids, weight, capacity
        self.graphs: list | None = None
        self._weight_at = None  # the weight's address, strides and rows when captured

    def _weight_fingerprint(self):
        w = self.weight
        return None if w is None else (w.data_ptr(), w.stride(), w.shape, w.dtype)

    def _capture(self) -> None:
        op, tables = self.op, self.op.tables
        self._weight_at = self._weight_fingerprint()
        # warm-up outside the capture compiles the kernel; a step of 0 tokens writes nothing
        tables.step[0, :2] = 0
        op.launch(self.out, self.deepstack_out, self.input_ids, self.weight, self.capacity)
        torch.cuda.synchronize(tables.device)
        graphs = []
        for s in range(STAGING_RING):  # one graph per staging buffer: the copy's source is fixed
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                tables.enqueue_step_copy(s)
                op.launch(self.out, self.deepstack_out, self.input_ids, self.weight, self.capacity)
            graphs.append(graph)
        self.graphs = graphs

    def prepare(self, weight: torch.Tensor | None = None) -> None:
        """Before a step (its plan): capture the graphs, or capture them again when the
        weight moved (``Parameter.data`` swapped: a graph keeps the address it saw), so the
        step's run only replays."""
        if weight is not None:
            self.weight = weight
        if self.graphs is None or (self.weight is not None and self._weight_fingerprint() != self._weight_at):
            self._capture()

    def replay(self) -> None:
        """Replay the graph of the staging buffer the step just filled (``prepare`` first)."""
        self.graphs[self.op.tables.slot].replay()
