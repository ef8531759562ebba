"""The resident assembler: register a request once, then each step sends only windows.

``add_request`` turns a request's items into position-ordered runs once and queues them
for the device; ``assemble`` checks the step's windows in array operations, resolves
sources only for items a window reaches first (encoded across the step), sends the step
table in one copy and launches once (or replays a CUDA graph); ``remove_request`` frees
the request's slots and sources. Calls are serialised by a lock, so threads may share one.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import torch

import mmkernels
from mmassembler.cache import EmbeddingCache
from mmassembler.encode import Encoder, EncoderFn
from mmassembler.errors import BatchShapeError
from mmassembler.registry import Registry
from mmassembler.runs import MAX_REQUESTS, NO_LIMIT
from mmassembler.resolve import Wanted, resolve
from mmassembler.step_inputs import (FLOATS, check_input_ids, check_rows_buffer, check_windows,
                                     int_array)
from mmkernels import layout as L
from mmkernels.reference import assemble_step_ref
from mmkernels.step import StepOp, check_block_rows
from mmkernels.tables import STAGING_RING, ResidentTables


class Assembler:
    """Assemble a model's prefill steps from registered requests (see the module doc).

    Fused mode with ``weight`` ``[vocab, hidden]``: text rows are ``weight[clamp(id)]``.
    Scatter mode with ``hidden``/``dtype``/``device``: only multimodal rows are written
    into the caller's ``out``. ``cuda_graph=True`` captures the step's device work once
    and replays it; outputs then live in persistent buffers (``out=`` at construction in
    scatter mode). ``max_items``/``max_runs`` size the resident tables.
    """

    def __init__(self, *, weight: torch.Tensor | None = None, hidden: int | None = None,
                 dtype: torch.dtype | None = None, device=None, max_tokens: int, max_requests: int,
                 max_items: int | None = None, max_runs: int | None = None,
                 encoders: Mapping[str, EncoderFn | Encoder] | None = None,
                 cache: EmbeddingCache | None = None, deepstack_cols: int = 0,
                 backend: str = "auto", cuda_graph: bool = False, out: torch.Tensor | None = None,
                 deepstack_out: torch.Tensor | None = None, block_rows: int | None = None):
        if weight is not None:
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] == 0:
                raise BatchShapeError("weight must be a 2-D [vocab, hidden] tensor with vocab >= 1")
            check_rows_buffer("weight", weight, weight.shape[0], weight.shape[1], weight.dtype,
                              weight.device)
            hidden, dtype, device = weight.shape[1], weight.dtype, weight.device
        elif hidden is None or dtype is None or device is None:
            raise BatchShapeError("pass weight (fused mode) or hidden, dtype and device (scatter mode)")
        for name, v in (("max_tokens", max_tokens), ("max_requests", max_requests),
                        ("hidden", hidden), ("deepstack_cols", deepstack_cols + 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BatchShapeError(f"{name} must be a positive int, got {v!r}")
        if max_requests > MAX_REQUESTS:
            raise BatchShapeError(f"max_requests must be at most {MAX_REQUESTS}, got {max_requests}")
        if dtype not in FLOATS:
            raise BatchShapeError(f"dtype must be one of {FLOATS}, got {dtype}")
        self.weight, self.hidden, self.dtype = weight, hidden, dtype
        self.device, self.deepstack_cols = _full_device(device), deepstack_cols
        self.max_tokens, self.max_requests = max_tokens, max_requests
        self.encoders, self.cache = encoders, cache
        self.widths = (hidden, hidden + deepstack_cols)
        try:
            check_block_rows(block_rows)
        except ValueError as exc:
            raise BatchShapeError(str(exc)) from None
        self.backend = mmkernels.resolve_backend(backend, self.device)
        max_items = max_items or 64 * max_requests + 1024
        max_runs = max_runs or 4 * max_items
        self.registry = Registry(max_requests=max_requests, max_runs=max_runs, max_items=max_items)
        self.tables = ResidentTables(self.device, max_requests=max_requests, max_runs=max_runs)
        self._op = None if self.backend == "torch" else StepOp(
            self.tables, hidden=hidden, ds_cols=deepstack_cols, dtype=dtype, weight=weight,
            interpreted=self.backend == "interpreter", block_rows=block_rows)
        self._bad = np.zeros((4, max_requests), bool)  # scratch of the window check
        self._lock = threading.RLock()
        self._graph = None
        if cuda_graph:
            self._graph = _GraphState(self, out, deepstack_out)

    @property
    def input_ids(self) -> torch.Tensor | None:
        """Graph mode: the persistent ``[max_tokens]`` id buffer; a step whose ``input_ids``
        is a prefix of it skips the copy into it. ``None`` otherwise."""
        return self._graph.input_ids if self._graph is not None else None

    # -- registration ---------------------------------------------------------------------
    def add_request(self, items: Sequence, prompt_len: int | None = None) -> int:
        """Register a request's items (checked once); returns its handle.

        Raises ``SpanError`` (spans, masks, keys) or ``CapacityError`` before any change.
        """
        _check_prompt_len(prompt_len, None)
        with self._lock:
            return self.registry.add(items, None if prompt_len is None else int(prompt_len))

    def add_requests(self, requests: Sequence[tuple[Sequence, int | None]]) -> list[int]:
        """Register several requests ``(items, prompt_len)`` at once (one write per table:
        what a step with many new requests wants); their handles, in order. Raises
        ``SpanError`` naming the request's index, or ``CapacityError``, before any change."""
        requests = list(requests)
        for i, (_, prompt_len) in enumerate(requests):
            _check_prompt_len(prompt_len, i)
        with self._lock:
            return self.registry.add_many([(items, None if p is None else int(p)) for items, p in requests])

    def remove_request(self, handle: int) -> None:
        """Free a request's slots and every reference held to its sources."""
        with self._lock:
            self._release(self.registry.remove(handle))

    def _release(self, tensors: list) -> None:
        if self.device.type == "cuda" and tensors:
            stream = torch.cuda.current_stream(self.device)
            for t in tensors:  # the allocator may not hand its memory out before queued steps ran
                t.record_stream(stream)

    # -- a step ---------------------------------------------------------------------------
    def assemble(self, handles, prefix_lens, extend_lens, input_ids: torch.Tensor | None = None, *,
                 out: torch.Tensor | None = None,
                 deepstack_out: torch.Tensor | None = None) -> torch.Tensor:
        """The step's input embeddings, ``[sum(extend_lens), hidden]``.

        Request ``i`` (``handles[i]``) contributes prompt positions ``[prefix_lens[i],
        prefix_lens[i] + extend_lens[i])`` at output rows from ``sum(extend_lens[:i])``.
        The three sequences are lists or 1-D int arrays (numpy or CPU torch). Raises an
        ``AssemblyError`` before anything is written.
        """
        with self._lock:
            h = int_array(handles, "handles")
            p = int_array(prefix_lens, "prefix_lens")
            e = int_array(extend_lens, "extend_lens")
            r = len(h)
            table = self.tables.staging_table()
            fits = len(p) == r == len(e) and r <= self.max_requests
            n = self._fill(table, h, p, e) if fits else None
            if n is None or n > self.max_tokens:  # a bad window, or one that needs sources
                reg = self.registry
                n = check_windows(h, p, e, reg, self.max_requests, self.max_tokens)
                out, deepstack_out, input_ids = self._buffers(n, input_ids, out, deepstack_out)
                q = p + e
                work = reg.needs_work(h, p, q)
                if len(work):
                    self._resolve(work, h, p, q)
                self._fill(table, h, p, e)
            else:
                out, deepstack_out, input_ids = self._buffers(n, input_ids, out, deepstack_out)
            self._flush()
            table[0, L.STEP_TOKENS], table[0, L.STEP_REQUESTS] = n, r
            if self._graph is not None:
                return self._graph.replay(n, input_ids)
            if self._op is None:
                assemble_step_ref(out, deepstack_out, input_ids, self.weight, self.registry.runs, table,
                                  self.registry.item_src)
                self.tables.mark_sent()
            else:
                self.tables.upload_step(r)
                self._op.launch(out, deepstack_out, input_ids, n)
            return out

    def _fill(self, table: np.ndarray, h: np.ndarray, p: np.ndarray, e: np.ndarray) -> int | None:
        """Write the windows' rows of the staging table (a fixed number of array calls);
        their token count, or ``None`` when a window is bad or needs work.

        Each request's registry row is gathered whole (a bad handle clips to a sentinel
        row), then the windows go beside their bounds and two comparisons check them all.
        """
        r = len(h)
        rows = table[1:r + 1]
        self.registry.req.take(h, 0, rows, "clip")
        rows[:, L.STEP_PREFIX] = p
        np.add(p, e, out=rows[:, L.STEP_STOP])
        np.add.accumulate(e, out=table[2:r + 2, L.STEP_BASE])  # row 1's base is 0 (gathered)
        bad = self._bad[:, :r]  # [check, request]: contiguous per check, for large r
        # READY_LO <= PREFIX <= STOP <= READY_HI and PREFIX <= START_MAX; READY_HI is at most
        # NO_LIMIT, so the bases cannot overflow
        np.greater(rows[:, L.STEP_READY_LO:L.STEP_READY_HI].T, rows[:, L.STEP_PREFIX:L.STEP_READY_HI + 1].T,
                   out=bad[:3])
        np.greater(rows[:, L.STEP_PREFIX], rows[:, L.STEP_START_MAX], out=bad[3])
        return None if np.count_nonzero(bad) else table.item(r + 1, L.STEP_BASE)

    def _buffers(self, n, input_ids, out, deepstack_out):
        """Check (and in fused mode allocate) the step's buffers."""
        fused = self.weight is not None
        if fused or input_ids is not None:
            check_input_ids(input_ids, n, self.device)
        if self._graph is not None:
            if out is not None or deepstack_out is not None:
                raise BatchShapeError("a cuda_graph Assembler writes its persistent buffers; "
                                      "pass out/deepstack_out at construction")
            return None, None, input_ids
        if out is None:
            if not fused:
                raise BatchShapeError("scatter mode (no weight) needs out=")
            out = torch.empty((n, self.hidden), dtype=self.dtype, device=self.device)
        else:
            check_rows_buffer("out", out, n, self.hidden, self.dtype, self.device)
        if self.deepstack_cols:
            if deepstack_out is None:
                raise BatchShapeError(f"deepstack_cols={self.deepstack_cols}: pass deepstack_out=")
            check_rows_buffer("deepstack_out", deepstack_out, n, self.deepstack_cols, self.dtype,
                              self.device)
        elif deepstack_out is not None:
            raise BatchShapeError("deepstack_out given, but the Assembler has deepstack_cols=0")
        return out, deepstack_out, input_ids

    def _resolve(self, work: np.ndarray, h, p, q) -> None:
        """Sources for items the windows ``work`` reach first; release items they passed."""
        reg = self.registry
        hw, pw, qw = h[work], p[work], q[work]
        if np.bincount(h).max() > 1:  # a release below must see every window of a request
            check_windows(h, p, q - p, reg, self.max_requests, self.max_tokens)
        ridx, rwin, iidx, iwin = reg.reached(hw)
        runs = reg.runs[ridx]
        hit = (runs[:, L.HOST_RUN_POS] < qw[rwin]) & (runs[:, L.HOST_RUN_END] > pw[rwin])
        slots = reg.unheld_among(runs[hit, L.HOST_RUN_ITEM], iidx)
        passed = iidx[reg.held[iidx] & (reg.item_end[iidx] <= pw[iwin])]
        index_of = dict(zip(h.tolist(), range(len(h))))
        wanted = [Wanted(s, item, rows, index_of[owner]) for s, item, rows, owner in zip(
            slots.tolist(), reg.item_obj[slots].tolist(), reg.item_rows[slots].tolist(),
            reg.item_owner[slots].tolist())]
        sources, entries = resolve(wanted, encoders=self.encoders, cache=self.cache,
                                   device=self.device, widths=self.widths)
        # every check has passed: commit (the changed runs' device rows go with the next flush)
        self._release([t for t in reg.item_src[passed] if t is not None])
        reg.set_sources(slots, sources, entries, passed, ridx)
        reg.update_ready(hw, pw, qw, ridx, rwin, iidx, iwin)

    def _flush(self) -> None:
        """Send the run rows registration or a source change made stale (one upload)."""
        if self.registry.dirty_runs:
            self.tables.write_runs(*self.registry.take_dirty_runs())


def _check_prompt_len(prompt_len, request: int | None) -> None:
    """``None`` or an int in ``[0, NO_LIMIT]``."""
    if prompt_len is not None and (isinstance(prompt_len, bool) or not isinstance(
            prompt_len, (int, np.integer)) or not 0 <= prompt_len <= NO_LIMIT):
        raise BatchShapeError(f"prompt_len must be None or an int in [0, 2**40], got {prompt_len!r}",
                              request=request)


def _full_device(device) -> torch.device:
    """``device`` with its index (``cuda`` means the current CUDA device), for comparisons."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _GraphState:
    """Persistent buffers and one captured graph per staging buffer (copy + kernel)."""

    def __init__(self, asm: Assembler, out, deepstack_out):
        if asm.backend != "triton" or asm.device.type != "cuda":
            raise mmkernels.BackendUnavailableError("cuda_graph=True needs compiled Triton on CUDA")
        t, h, d = asm.max_tokens, asm.hidden, asm.deepstack_cols
        if out is None:
            if asm.weight is None:
                raise BatchShapeError("a scatter-mode cuda_graph Assembler needs out= (persistent)")
            out = torch.empty((t, h), dtype=asm.dtype, device=asm.device)
        check_rows_buffer("out", out, t, h, asm.dtype, asm.device)
        if d and deepstack_out is None:
            deepstack_out = torch.zeros((t, d), dtype=asm.dtype, device=asm.device)
        if d:
            check_rows_buffer("deepstack_out", deepstack_out, t, d, asm.dtype, asm.device)
        self.asm, self.out, self.deepstack_out = asm, out, deepstack_out
        self.input_ids = torch.zeros(t, dtype=torch.int64, device=asm.device)
        self.graphs: list | None = None

    def _capture(self) -> None:
        asm, tables = self.asm, self.asm.tables
        # warm-up outside the capture compiles the kernel; a step of 0 tokens writes nothing
        tables.step[0, :2] = 0
        asm._op.launch(self.out, self.deepstack_out, self.input_ids, asm.max_tokens)
        torch.cuda.synchronize(asm.device)
        self.graphs = []
        for s in range(STAGING_RING):  # one graph per staging buffer: the copy's source is fixed
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                tables.step.copy_(tables.staging[s], non_blocking=True)
                asm._op.launch(self.out, self.deepstack_out, self.input_ids, asm.max_tokens)
            self.graphs.append(graph)

    def replay(self, n: int, input_ids) -> torch.Tensor:
        if self.graphs is None:
            self._capture()
        if input_ids is not None and input_ids.data_ptr() != self.input_ids.data_ptr():
            self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.graphs[self.asm.tables.slot].replay()
        self.asm.tables.mark_sent()
        return self.out[:n]
