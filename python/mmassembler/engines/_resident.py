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
The Assembler is sized from the engine's limits when the caller passes them; otherwise a
step that does not fit rebuilds it larger and requests register again.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence

import torch

from mmassembler.assembler import Assembler
from mmassembler.identity import ObjectState
from mmassembler.errors import BatchShapeError, CapacityError
from mmassembler.runs import MAX_REQUESTS
from mmassembler.step_inputs import int_array
from mmkernels import capacity_for

logger = logging.getLogger(__name__)

MIN_TOKENS, MIN_REQUESTS = 8192, 64  # sizes when the engine's limits are not given


class Resident:
    """An ``Assembler`` plus the engine-request -> handle map the adapter keeps beside it.

    Sized from the engine's limits (``max_tokens``: tokens a step, ``max_requests``:
    requests running at once) when the caller gives them; otherwise from
    ``MIN_TOKENS``/``MIN_REQUESTS``, rebuilt larger (``mmkernels.capacity_for``) by a step
    that does not fit, with a warning: pass the limits to keep growth out of serving."""

    def __init__(self, *, weight: torch.Tensor | None, hidden: int, dtype: torch.dtype, device,
                 deepstack_cols: int, backend: str = "auto", max_tokens: int | None = None,
                 max_requests: int | None = None):
        # the weight is held only during a step (the engine hands it in each time), so state
        # kept beside a bare weight tensor never keeps the tensor alive
        self._spec = dict(hidden=hidden, dtype=dtype, device=device, deepstack_cols=deepstack_cols,
                          backend=backend)
        self._weight = (lambda: None) if weight is None else weakref.ref(weight)
        self._lock = threading.RLock()
        self._dead: list[int] = []  # handles whose engine request was dropped
        self.asm: Assembler | None = None
        self.limits_given = max_tokens is not None and max_requests is not None
        self._build(max_tokens or MIN_TOKENS, max_requests or MIN_REQUESTS, None, weight)

    def _build(self, max_tokens: int, max_requests: int, max_items: int | None,
               weight: torch.Tensor | None = None) -> None:
        spec = self._spec
        weight = self._weight() if weight is None else weight
        kw = (dict(weight=weight) if weight is not None else
              dict(hidden=spec["hidden"], dtype=spec["dtype"], device=spec["device"]))
        self.asm = Assembler(max_tokens=max_tokens, max_requests=max_requests, max_items=max_items,
                             deepstack_cols=spec["deepstack_cols"], backend=spec["backend"], **kw)
        self.asm.weight = None  # handed in by each step
        self._entries: dict[int, tuple] = {}  # id(request) -> (weakref, handle, snapshot)
        self._dead = []  # handles of the old Assembler mean nothing to the new one
        self._text: list[int] = []  # empty requests: the k-th text-only request of a step uses [k]

    def fits(self, max_tokens: int | None, max_requests: int | None) -> bool:
        asm = self.asm
        return (max_tokens is None or asm.max_tokens >= max_tokens) and (
            max_requests is None or asm.max_requests >= max_requests)

    def _grow(self, tokens: int, requests: int, items: int) -> None:
        """Rebuild larger for a step of ``tokens``, ``requests`` and ``items`` (every request
        registers again)."""
        asm = self.asm
        t = capacity_for(tokens, asm.max_tokens, MIN_TOKENS)
        r = capacity_for(requests, asm.max_requests, MIN_REQUESTS, MAX_REQUESTS)
        i = capacity_for(items + 1, asm.registry.max_items, 64 * r + 1024)
        logger.warning("growing the adapter's Assembler to %d tokens, %d requests, %d items inside a step: "
                       "pass the engine's limits (max_tokens=, max_requests=) to size it once", t, r, i)
        self._build(t, r, i)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._dead.append(entry[1])

    def _remove_dead(self) -> None:
        if self._dead:
            dead, self._dead = self._dead, []
            self.asm.remove_requests(dead)

    def handles(self, owners: Sequence, fingerprints: Callable, columns: Callable) -> list:
        """A handle per request: ``owners[i]`` (``None`` for a text-only request) registered
        when new, or when its fingerprint (``fingerprints(owners)``: one value per request
        compared with ``==``, holding the item objects whose ``id``s it records, so an id
        cannot be reused while it is kept) differs from the registered one. New requests
        are registered together from ``columns(new owners)``. The same engine request twice
        in one step is a ``BatchShapeError`` before anything is registered."""
        asm = self.asm
        self._remove_dead()
        out = [0] * len(owners)
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
            for i, h in zip([i for i, o in enumerate(owners) if o is None], self._text):
                out[i] = h
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
        """``Assembler.assemble`` for the engine's requests (``prefix`` and ``extend`` lists
        of ints). A step that does not fit the Assembler rebuilds it first (see the class)."""
        with self._lock:
            if type(prefix) is not list or type(extend) is not list:
                prefix = int_array(prefix, "prefix_lens").tolist()
                extend = int_array(extend, "extend_lens").tolist()
            n, r = sum(extend), len(owners)
            asm = self.asm
            if n > asm.max_tokens or r > asm.max_requests:
                self._grow(n, r, 0)
            try:
                h = self.handles(owners, fingerprints, columns)
            except CapacityError:  # the request or item table is full: size for every request again
                real = [o for o in owners if o is not None]
                self._grow(n, len(owners) + 1, len(columns(real).keys))
                h = self.handles(owners, fingerprints, columns)
            try:
                return self.asm.assemble(h, prefix, extend, input_ids, out=out, deepstack_out=deepstack_out,
                                         weight=self._weight(), encoders=encoders, cache=cache)
            finally:
                self._remove_dead()  # requests registered for this step only


_by_module = ObjectState()  # embedding module (or a bound method's instance) -> {config: Resident}


def resident_for(embed, weight: torch.Tensor | None, ref: torch.Tensor, deepstack_cols: int,
                 backend: str, max_tokens: int | None = None, max_requests: int | None = None) -> Resident:
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
    if res is None or res._weight() is not weight or not res.fits(max_tokens, max_requests):
        # a new module weight, or limits the Assembler was not made for: a new Assembler
        res = table[key] = Resident(weight=weight, hidden=int(ref.shape[1]), dtype=ref.dtype,
                                    device=ref.device, deepstack_cols=deepstack_cols, backend=backend,
                                    max_tokens=max_tokens, max_requests=max_requests)
    return res
