"""The one pool of step tables for one-shot calls (the stateless ``assemble`` and the segment
ops), per device, stream and backend, and the one rule capacities grow by.

A one-shot call takes the pool's tables under its lock (``TablePool.hold``), sized for
what it needs before anything is written: at least the next powers of two of what it
asks, never shrinking, and never past ``MAX_REQUESTS`` requests (``capacity_for``). A call
made on a thread that already holds the pool (an encoder making a one-shot call inside
one) gets tables of its own for that call, so nested calls work and never rewrite the
outer call's tables. The pool has its own stream key: a call on another stream never
rewrites tables a queued kernel still reads.
"""

from __future__ import annotations

import threading

import torch

from mmkernels.step_op import StepOps
from mmkernels.tables import ResidentTables

MAX_REQUESTS = 1 << 20  # requests one step may hold (step tables are sized by it)


class CapacityLimitError(ValueError):
    """A one-shot call needs more than any table may hold."""


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def capacity_for(need: int, have: int, least: int, limit: int | None = None, what: str = "requests") -> int:
    """The capacity a table grows to for ``need`` entries: ``have`` when it fits (and is at
    least ``least``), else the next power of two of ``need``, at least ``least`` (and at
    most ``limit``); ``CapacityLimitError`` when ``need`` is past ``limit``, before anything
    grows."""
    if limit is not None and need > limit:
        raise CapacityLimitError(f"{need} {what} in one call exceed the limit of {limit}")
    if need <= have and have >= least:
        return have
    grown = max(_pow2(need), least)
    return grown if limit is None else min(grown, limit)


class TablePool:
    """Tables and step ops of one-shot calls on one device, stream and backend."""

    def __init__(self, device: torch.device, backend: str):
        self.device, self.backend = device, backend
        self.interpreted = backend == "interpreter"
        self.lock = threading.Lock()
        self.owner: int | None = None  # the thread holding the pool
        self.tables: ResidentTables | None = None
        self.ops: StepOps | None = None
        self.host = None  # what the host layer keeps beside these tables (its StepCore)

    def fit(self, requests: int, runs: int) -> tuple[ResidentTables, StepOps]:
        """The pool's tables, rebuilt larger when ``requests`` or ``runs`` do not fit (call
        with the pool held)."""
        t = self.tables
        have_r, have_k = (0, 0) if t is None else (t.max_requests, t.max_runs)
        r = capacity_for(requests, have_r, 16, MAX_REQUESTS)
        k = capacity_for(runs, have_k, 64, None, "runs")
        if t is None or (r, k) != (have_r, have_k):
            self.tables = t = ResidentTables(self.device, max_requests=r, max_runs=k)
            self.ops = StepOps(t, interpreted=self.interpreted)
            self.host = None
        return t, self.ops

    def hold(self) -> "_Held":
        """``with pool.hold() as own:`` -- ``own`` is False, or True for a call nested inside
        another on this thread (which must then use tables of its own)."""
        return _Held(self)


class _Held:
    __slots__ = ("pool", "nested")

    def __init__(self, pool: TablePool):
        self.pool, self.nested = pool, False

    def __enter__(self) -> bool:
        pool = self.pool
        if pool.owner == threading.get_ident():
            self.nested = True
            return True
        pool.lock.acquire()
        pool.owner = threading.get_ident()
        return False

    def __exit__(self, *exc) -> bool:
        if not self.nested:
            self.pool.owner = None
            self.pool.lock.release()
        return False


_pools: dict = {}
_pools_lock = threading.Lock()


def table_pool(device: torch.device, backend: str) -> TablePool:
    """The pool of ``device``'s current stream for a resolved ``backend``."""
    stream = torch._C._cuda_getCurrentRawStream(device.index or 0) if device.type == "cuda" else 0
    key = (device, stream, backend)
    pool = _pools.get(key)
    if pool is None:
        with _pools_lock:
            pool = _pools.setdefault(key, TablePool(device, backend))
    return pool
