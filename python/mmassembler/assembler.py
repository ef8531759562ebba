"""The resident assembler: register a request once, then each step sends only windows.

``add_requests`` turns requests' items into position-ordered runs once; a step is a
``plan`` (windows checked, sources resolved only for items a window reaches first,
encoded across the step, tables staged: all host work) and a ``run`` (one table copy and
one launch, or a CUDA-graph replay); ``assemble`` does both. ``remove_requests`` frees
the requests' slots and sources. Calls are serialised by a lock, so threads may share
one; a call from inside another on the same thread (an encoder stepping the Assembler
that calls it) is a ``ReentrantCallError``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from threading import get_ident

import torch

import mmkernels
from mmassembler.cache import EmbeddingCache
from mmassembler.core import StepCore, StepPlan
from mmassembler.encode import Encoder, EncoderFn
from mmassembler.errors import BatchShapeError, ReentrantCallError
from mmassembler.runs import MAX_REQUESTS, NO_LIMIT, NewRequests, check_items_type, request_columns
from mmassembler.step_inputs import FLOATS, StepSpec, check_cache, check_encoders, check_rows_buffer
from mmkernels import StepGraph, check_block_rows


_KEEP = object()  # "the Assembler's own" for per-call overrides


class Assembler:
    """Assemble a model's prefill steps from registered requests (see the module doc).

    Fused mode with ``weight`` ``[vocab, hidden]``: text rows are ``weight[clamp(id)]``.
    Scatter mode with ``hidden``/``dtype``/``device``: only multimodal rows are written
    into the caller's ``out``. ``cuda_graph=True`` captures the step's device work once
    and replays it; outputs then live in persistent buffers (``out=`` at construction in
    scatter mode). ``max_items``/``max_runs`` size the resident tables.
    ``check_stable`` (a debug option) checks at every step that no source read in place (a
    ``stable`` encoder's output) was written since it was read: ``SourceChangedError``.
    """

    def __init__(self, *, weight: torch.Tensor | None = None, hidden: int | None = None,
                 dtype: torch.dtype | None = None, device=None, max_tokens: int, max_requests: int,
                 max_items: int | None = None, max_runs: int | None = None,
                 encoders: Mapping[str, EncoderFn | Encoder] | None = None,
                 cache: EmbeddingCache | None = None, deepstack_cols: int = 0,
                 backend: str = "auto", cuda_graph: bool = False, out: torch.Tensor | None = None,
                 deepstack_out: torch.Tensor | None = None, block_rows: int | None = None,
                 check_stable: bool = False):
        if isinstance(weight, torch.nn.Module):
            raise BatchShapeError(f"weight is a {type(weight).__name__} module; pass its table "
                                  "(for nn.Embedding: weight=embedding.weight)")
        if weight is not None:
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] == 0:
                raise BatchShapeError("weight must be a 2-D [vocab, hidden] tensor with vocab >= 1")
            check_rows_buffer("weight", weight, weight.shape[0], weight.shape[1], weight.dtype,
                              weight.device)
            hidden, dtype, device = weight.shape[1], weight.dtype, weight.device
        elif hidden is None or dtype is None or device is None:
            raise BatchShapeError("pass weight (fused mode) or hidden, dtype and device (scatter mode)")
        for name, v, least in (("max_tokens", max_tokens, 1), ("max_requests", max_requests, 1),
                               ("hidden", hidden, 1), ("deepstack_cols", deepstack_cols, 0),
                               ("max_items", 1 if max_items is None else max_items, 1),
                               ("max_runs", 1 if max_runs is None else max_runs, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise BatchShapeError(f"{name} must be an int >= {least}, got {v!r}")
        if max_requests > MAX_REQUESTS:
            raise BatchShapeError(f"max_requests must be at most {MAX_REQUESTS}, got {max_requests}")
        if max_tokens > NO_LIMIT:
            raise BatchShapeError(f"max_tokens must be at most 2**40, got {max_tokens}")
        if dtype not in FLOATS:
            raise BatchShapeError(f"dtype must be one of {FLOATS}, got {dtype}")
        check_encoders(encoders)
        check_cache(cache)
        self.weight, self.hidden, self.dtype = weight, hidden, dtype
        self.fused = weight is not None
        self.device, self.deepstack_cols = _full_device(device), deepstack_cols
        self.max_tokens, self.max_requests = max_tokens, max_requests
        self.encoders, self.cache = encoders, cache
        self.widths = (hidden, hidden + deepstack_cols)
        try:
            check_block_rows(block_rows)
            self.backend = mmkernels.resolve_backend(backend, self.device)
        except ValueError as exc:
            raise BatchShapeError(str(exc)) from None
        max_items = max_items or 64 * max_requests + 1024
        max_runs = max_runs or 4 * max_items
        self._core = StepCore(self.device, backend=self.backend, max_tokens=max_tokens,
                              max_requests=max_requests, max_runs=max_runs, max_items=max_items,
                              check_stable=check_stable)
        self.registry, self.tables = self._core.registry, self._core.tables
        self._op = self._core.op(hidden=hidden, ds_cols=deepstack_cols, dtype=dtype,
                                 fused=weight is not None, block_rows=block_rows)
        self._lock = threading.Lock()
        self._owner = self._inside = None  # the thread inside a call, and which call
        self._spec = StepSpec(hidden, deepstack_cols, dtype, self.device, weight is not None)
        self._graph = None
        if cuda_graph:
            self._graph = _graph_for(self, out, deepstack_out)
            self._graph.prepare()  # captured now, not inside a step
        elif self.backend == "triton" and self.device.type == "cuda":
            _warm(self)

    def __repr__(self) -> str:
        mode = "fused" if self.fused else "scatter"
        return (f"Assembler({mode}, hidden={self.hidden}, {str(self.dtype).replace('torch.', '')}, "
                f"{self.device}, backend={self.backend}, {self.registry.num_live}/{self.max_requests} "
                f"requests, {self.registry.live_items} items, {self._core.stats.steps} steps)")

    def __len__(self) -> int:
        """Live (registered, not yet removed) requests."""
        return self.registry.num_live

    def __bool__(self) -> bool:
        """Always true, even with no live request (``asm or Assembler(...)`` keeps ``asm``)."""
        return True

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
        check_items_type(items)
        return self.add_requests([(items, prompt_len)])[0]

    def add_requests(self, requests: Sequence[tuple[Sequence, int | None]] | NewRequests) -> list[int]:
        """Register several requests ``(items, prompt_len)`` at once (plain Python over
        their items, no array operation: what a step with new requests wants); their
        handles, in order. ``requests`` may also be ``NewRequests`` columns (what the
        engine adapters fill straight from the engine's objects). Raises ``SpanError``
        naming the request's index, or ``CapacityError``, before any change."""
        new = requests if type(requests) is NewRequests else request_columns(requests)
        self._enter("add_requests")
        try:
            return self._core.add(new)
        finally:
            self._leave()

    def remove_request(self, handle: int) -> None:
        """Free a request's slots and every reference held to its sources."""
        self.registry.check_live(handle)
        self.remove_requests([handle])

    def remove_requests(self, handles) -> None:
        """Free several requests' slots and sources at once; a bad or repeated handle raises
        before any is removed."""
        self._enter("remove_requests")
        try:
            self._core.remove(handles)
        finally:
            self._leave()

    def stats(self) -> dict:
        """What the Assembler holds and has done: live requests and items, held sources and
        their bytes, capacity used per table, steps, first contacts (items given a source),
        encoder calls and rows, and cache hits and misses (``cache`` stats when it has one)."""
        reg, core = self.registry, self._core
        storages = {}
        held = 0
        for rec in reg.recs:
            if rec is None:
                continue
            for j in rec.held:
                held += 1
                st = rec.batch.srcs[j][0].untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        return dict(live_requests=reg.num_live, live_items=reg.live_items, live_runs=reg.live_runs,
                    held_sources=held, held_bytes=sum(storages.values()),
                    requests_used=f"{reg.num_live}/{reg.max_requests}",
                    items_used=f"{reg.live_items}/{reg.max_items}",
                    runs_used=f"{reg.live_runs}/{reg.max_runs}", **core.stats.as_dict(),
                    cache=None if self.cache is None else vars(self.cache.stats).copy())

    def dump_step(self, handles, prefix_lens, extend_lens) -> str:
        """A readable account of a step's table (request, window, runs, sources), for bug
        reports; reads the registry only, changes nothing."""
        from mmassembler.debug import describe_step

        return describe_step(self, handles, prefix_lens, extend_lens)

    # -- a step ---------------------------------------------------------------------------
    def plan(self, handles, prefix_lens, extend_lens, input_ids: torch.Tensor | None = None, *,
             out: torch.Tensor | None = None, deepstack_out: torch.Tensor | None = None,
             weight=_KEEP, encoders=_KEEP, cache=_KEEP) -> StepPlan:
        """All host work of a step (windows and buffers checked, sources of items reached
        first resolved and encoded, tables staged), for ``run``: an engine that knows step
        N+1 while step N runs on the GPU plans it then. ``weight``, ``encoders`` and
        ``cache`` override the constructor's for this step. Raises an ``AssemblyError``
        before anything changes. Plans run in order, each once; a plan made before the last
        one ran replaces it."""
        w = self.weight if weight is _KEEP else weight
        self._enter("plan")
        try:
            return self._core.plan(
                handles, prefix_lens, extend_lens, spec=self._spec, op=self._op, weight=w, input_ids=input_ids,
                out=out, deepstack_out=deepstack_out, encoders=self.encoders if encoders is _KEEP else encoders,
                cache=self.cache if cache is _KEEP else cache, graph=self._graph)
        finally:
            self._leave()

    def run(self, plan: StepPlan) -> torch.Tensor:
        """Send what ``plan`` staged and launch it (or replay the CUDA graph); returns the
        step's input embeddings. Nothing else: no check, no allocation."""
        self._enter("run")
        try:
            return self._core.run(plan)
        finally:
            self._leave()

    def assemble(self, handles, prefix_lens, extend_lens, input_ids: torch.Tensor | None = None, *,
                 out: torch.Tensor | None = None, deepstack_out: torch.Tensor | None = None,
                 weight=_KEEP, encoders=_KEEP, cache=_KEEP) -> torch.Tensor:
        """The step's input embeddings, ``[sum(extend_lens), hidden]``: ``plan`` then ``run``.

        Request ``i`` (``handles[i]``) contributes prompt positions ``[prefix_lens[i],
        prefix_lens[i] + extend_lens[i])`` at output rows from ``sum(extend_lens[:i])``.
        The three sequences are lists or 1-D int arrays (numpy or CPU torch). Raises an
        ``AssemblyError`` before anything is written.
        """
        w = self.weight if weight is _KEEP else weight
        self._enter("assemble")
        try:
            core = self._core
            return core.run(core.plan(
                handles, prefix_lens, extend_lens, spec=self._spec, op=self._op, weight=w, input_ids=input_ids,
                out=out, deepstack_out=deepstack_out, encoders=self.encoders if encoders is _KEEP else encoders,
                cache=self.cache if cache is _KEEP else cache, graph=self._graph))
        finally:
            self._leave()

    def _enter(self, what: str) -> None:
        """Take the Assembler's lock for call ``what``; a call made from inside another on
        this thread (an encoder stepping the Assembler that calls it) is a
        ``ReentrantCallError`` instead of a deadlock or two steps' tables interleaved."""
        lock = self._lock
        if not lock.acquire(False):
            if self._owner == get_ident():
                raise ReentrantCallError(
                    f"Assembler.{what} called from inside Assembler.{self._inside} on the same thread "
                    "(from an encoder?): an encoder must not step, register or remove on the Assembler "
                    "that calls it")
            lock.acquire()
        self._owner, self._inside = get_ident(), what

    def _leave(self) -> None:
        """Give the lock ``_enter`` took back."""
        self._owner = None
        self._lock.release()


def _full_device(device) -> torch.device:
    """``device`` with its index (``cuda`` means the current CUDA device), for comparisons."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _warm(asm: Assembler) -> None:
    """Compile the kernel for every block shape the steps of this Assembler may pick (its
    own outputs, int64 ids, its weight), so no step pays a compile."""
    h, d = asm.hidden, asm.deepstack_cols
    out = torch.empty((1, h), dtype=asm.dtype, device=asm.device)
    ds = torch.empty((1, d), dtype=asm.dtype, device=asm.device) if d else None
    ids = torch.zeros(1, dtype=torch.int64, device=asm.device)
    asm._op.warm(out, ds, ids, asm.weight)
    torch.cuda.synchronize(asm.device)


def _graph_for(asm: Assembler, out, deepstack_out) -> StepGraph:
    """Persistent buffers and the ``StepGraph`` of a ``cuda_graph`` Assembler."""
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
    ids = torch.zeros(t, dtype=torch.int64, device=asm.device)
    return StepGraph(asm._op, out, deepstack_out, ids, asm.weight, t)
