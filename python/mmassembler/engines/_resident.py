"""The adapters' resident ``Assembler``: each engine request registered once, a step sends
only windows.

An adapter keeps one ``Resident`` per text embedding (its weight table in fused mode, or
its module in scatter mode), device and deepstack width. An engine request object (SGLang's
``MultimodalInputs``, vLLM's ``CachedRequestState``) gets a handle the first step it
appears; while the request lives, a step compares a snapshot of its items (the item
objects, their placement and their precomputed tensors, by identity or value -- a few list
operations, no per-item calls) and re-registers the request if anything changed, so rows
never land where an item used to be. When the engine drops the request object, its handle
is queued and removed at the next step (never inside a garbage-collector callback).
Capacity grows by doubling: a step that does not fit rebuilds the Assembler and requests
register again.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mmassembler.assembler import Assembler
from mmassembler.identity import ObjectState
from mmassembler.errors import BatchShapeError, CapacityError
from mmassembler.step_inputs import int_array

logger = logging.getLogger(__name__)

MIN_TOKENS, MIN_REQUESTS = 8192, 64
GROWTHS = 8  # doublings one step may ask for (tables of 256x the requests)


class Resident:
    """An ``Assembler`` plus the engine-request -> handle map the adapter keeps beside it."""

    def __init__(self, *, weight: torch.Tensor | None, hidden: int, dtype: torch.dtype, device,
                 deepstack_cols: int, backend: str = "auto"):
        # the weight is held only during a step (the engine hands it in each time), so state
        # kept beside a bare weight tensor never keeps the tensor alive
        self._spec = dict(hidden=hidden, dtype=dtype, device=device, deepstack_cols=deepstack_cols,
                          backend=backend)
        self._weight = (lambda: None) if weight is None else weakref.ref(weight)
        self._lock = threading.RLock()
        self._dead: list[int] = []  # handles whose engine request was dropped
        self.asm: Assembler | None = None
        self._build(MIN_TOKENS, MIN_REQUESTS, weight)

    def _build(self, max_tokens: int, max_requests: int, weight: torch.Tensor | None = None) -> None:
        spec = self._spec
        weight = self._weight() if weight is None else weight
        kw = (dict(weight=weight) if weight is not None else
              dict(hidden=spec["hidden"], dtype=spec["dtype"], device=spec["device"]))
        self.asm = Assembler(max_tokens=max_tokens, max_requests=max_requests,
                             deepstack_cols=spec["deepstack_cols"], backend=spec["backend"], **kw)
        self.asm.weight = None  # handed in by each step
        self._entries: dict[int, tuple] = {}  # id(request) -> (weakref, handle, snapshot)
        self._dead = []  # handles of the old Assembler mean nothing to the new one
        self._text: list[int] = []  # empty requests: the k-th text-only request of a step uses [k]

    def _grow(self, tokens: int, requests: int) -> None:
        asm = self.asm
        t, r = asm.max_tokens, asm.max_requests
        while t < tokens:
            t *= 2
        while r < requests:
            r *= 2
        logger.info("growing the adapter's Assembler to %d tokens, %d requests", t, r)
        self._build(t, r)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._dead.append(entry[1])

    def _remove_dead(self) -> None:
        if self._dead:
            dead, self._dead = self._dead, []
            self.asm.remove_requests(dead)

    def handles(self, owners: Sequence, fingerprints: Callable, columns: Callable) -> np.ndarray:
        """A handle per request: ``owners[i]`` (``None`` for a text-only request) registered
        when new, or when its fingerprint (``fingerprints(owners)``: one value per request
        compared with ``==``, holding the item objects whose ``id``s it records, so an id
        cannot be reused while it is kept) differs from the registered one. New requests
        are registered together from ``columns(new owners)``. The same engine request twice
        in one step is a ``BatchShapeError`` before anything is registered."""
        asm = self.asm
        self._remove_dead()
        out = np.empty(len(owners), np.int64)
        real = [i for i, o in enumerate(owners) if o is not None]
        objs = [owners[i] for i in real]
        if len(set(map(id, objs))) != len(objs):
            seen: dict = {}
            for i in real:
                if seen.setdefault(id(owners[i]), i) != i:
                    raise BatchShapeError(f"the same engine request object is scheduled twice in one "
                                          f"step (at {seen[id(owners[i])]} and {i})", request=i)
        texts = len(owners) - len(real)
        while len(self._text) < texts:
            self._text.append(asm.add_request([], None))
        if texts:
            out[[i for i, o in enumerate(owners) if o is None]] = self._text[:texts]
        fps = fingerprints(objs)
        found = list(map(self._entries.get, map(id, objs)))
        new, stale = [], []
        for i, owner, fp, entry in zip(real, objs, fps, found):
            if entry is not None and entry[0]() is owner and entry[2] == fp:
                out[i] = entry[1]
                continue
            if entry is not None:
                stale.append(entry[1])
                del self._entries[id(owner)]
            new.append((i, owner, fp))
        if stale:
            asm.remove_requests(stale)
        if new:  # the step's new (or changed) requests, registered together
            hs = asm.add_requests(columns([o for _, o, _ in new]))
            me = weakref.ref(self)
            for (i, owner, fp), h in zip(new, hs):
                out[i] = h
                try:
                    ref = weakref.ref(owner, lambda _, key=id(owner): (
                        me() is not None and me()._drop(key)))
                except TypeError:  # no weak reference, no way to see it go: for this step only
                    self._dead.append(h)
                    continue
                self._entries[id(owner)] = (ref, h, fp)
        return out

    def step(self, owners: Sequence, fingerprints: Callable, columns: Callable, prefix, extend,
             input_ids: torch.Tensor, *, encoders, cache, out=None, deepstack_out=None) -> torch.Tensor:
        """``Assembler.assemble`` for the engine's requests, growing capacity as needed."""
        with self._lock:
            prefix, extend = int_array(prefix, "prefix_lens"), int_array(extend, "extend_lens")
            n, r = int(extend.sum()), len(owners)
            if n > self.asm.max_tokens or r > self.asm.max_requests:
                self._grow(n, r)
            for attempt in range(GROWTHS + 1):
                try:
                    h = self.handles(owners, fingerprints, columns)
                    break
                except CapacityError:  # the request or item table is full: double both
                    if attempt == GROWTHS:
                        raise
                    self._grow(self.asm.max_tokens, 2 * self.asm.max_requests)
            try:
                return self.asm.assemble(h, prefix, extend, input_ids, out=out, deepstack_out=deepstack_out,
                                         weight=self._weight(), encoders=encoders, cache=cache)
            finally:
                self._remove_dead()  # requests registered for this step only


_by_module = ObjectState()  # embedding module (or a bound method's instance) -> {config: Resident}


def resident_for(embed, weight: torch.Tensor | None, ref: torch.Tensor, deepstack_cols: int,
                 backend: str) -> Resident:
    """The ``Resident`` for a text embedding: fused on ``weight`` when it is a plain table,
    else scatter mode with ``ref``'s width, dtype and device. Kept beside the module, the
    bare weight tensor, or a bound method's instance (weakly: it goes with them; a bound
    method is a new object on every access, so its instance and function are the key)."""
    owner, func = getattr(embed, "__self__", None), getattr(embed, "__func__", None)
    if owner is None or func is None:
        owner, func = embed, None
    table = _by_module.get(owner)
    if table is None:
        table = _by_module.set(owner, {})
    key = (func, ref.device, ref.dtype, int(ref.shape[1]), deepstack_cols, backend, weight is not None)
    res = table.get(key)
    if res is None or res._weight() is not weight:  # a new module weight: a new Assembler
        res = table[key] = Resident(weight=weight, hidden=int(ref.shape[1]), dtype=ref.dtype,
                                    device=ref.device, deepstack_cols=deepstack_cols, backend=backend)
    return res
