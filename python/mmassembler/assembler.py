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

import torch

import mmkernels
from mmassembler.cache import EmbeddingCache
from mmassembler.core import StepCore
from mmassembler.encode import Encoder, EncoderFn
from mmassembler.errors import BatchShapeError
from mmassembler.runs import MAX_REQUESTS, NO_LIMIT, check_items_type, request_columns
from mmassembler.step_inputs import (FLOATS, check_cache, check_encoders, check_input_ids,
                                     check_rows_buffer)
from mmkernels import StepGraph, check_block_rows


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
        self._lock = threading.RLock()
        self._graph = None
        if cuda_graph:
            self._graph = _graph_for(self, out, deepstack_out)

    def __repr__(self) -> str:
        mode = "fused" if self.fused else "scatter"
        return (f"Assembler({mode}, hidden={self.hidden}, {str(self.dtype).replace('torch.', '')}, "
                f"{self.device}, backend={self.backend}, {self.registry.num_live}/{self.max_requests} "
                f"requests, {self.registry.live_items} items, {self._core.stats.steps} steps)")

    def __len__(self) -> int:
        """Live (registered, not yet removed) requests."""
        return self.registry.num_live

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

    def add_requests(self, requests: Sequence[tuple[Sequence, int | None]]) -> list[int]:
        """Register several requests ``(items, prompt_len)`` at once (array operations over
        all their items: what a step with many new requests wants); their handles, in
        order. Raises ``SpanError`` naming the request's index, or ``CapacityError``,
        before any change."""
        new = request_columns(requests)
        with self._lock:
            return self._core.add(new)

    def _add_columns(self, new) -> list[int]:
        """Register requests given as ``runs.NewRequests`` columns (the engine adapters fill
        them straight from the engine's objects)."""
        with self._lock:
            return self._core.add(new)

    def remove_request(self, handle: int) -> None:
        """Free a request's slots and every reference held to its sources."""
        self.registry.check_live(handle)
        self.remove_requests([handle])

    def remove_requests(self, handles) -> None:
        """Free several requests' slots and sources at once (array operations); a bad or
        repeated handle raises before any is removed."""
        with self._lock:
            self._core.remove(handles)

    def stats(self) -> dict:
        """What the Assembler holds and has done: live requests and items, held sources and
        their bytes, capacity used per table, steps, first contacts (items given a source),
        encoder calls and rows, and cache hits and misses (``cache`` stats when it has one)."""
        reg, core = self.registry, self._core
        held = reg.item_src[reg.held]
        storages = {}
        for t in held.tolist():
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return dict(live_requests=reg.num_live, live_items=reg.live_items, live_runs=reg.live_runs,
                    held_sources=int(reg.held.sum()), held_bytes=sum(storages.values()),
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
            return self._core.step(
                handles, prefix_lens, extend_lens,
                lambda n: self._buffers(n, input_ids, out, deepstack_out),
                weight=self.weight, op=self._op, widths=self.widths, encoders=self.encoders,
                cache=self.cache, graph=self._graph)

    def _buffers(self, n, input_ids, out, deepstack_out):
        """Check (and in fused mode allocate) the step's buffers."""
        fused, w = self.fused, self.weight
        if fused and (not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != self.hidden
                      or w.dtype != self.dtype or w.device != self.device or w.shape[0] == 0):
            raise BatchShapeError(f"the weight is now {getattr(w, 'dtype', None)} "
                                  f"{list(getattr(w, 'shape', []))} on {getattr(w, 'device', None)}; this "
                                  f"Assembler was made for [*, {self.hidden}] {self.dtype} on {self.device}")
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


def _full_device(device) -> torch.device:
    """``device`` with its index (``cuda`` means the current CUDA device), for comparisons."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


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
