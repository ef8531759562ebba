"""The back half both front doors share: registry, device tables, resolver and launcher.

``StepCore`` registers batches of requests (``add``), assembles a step of windows over
them (``step``) and removes them (``remove``), all in array operations. The ``Assembler``
keeps one for a model; the stateless ``assemble`` is a first contact on a pooled one
(register, step, remove). A step whose windows reach nothing new checks them in two
comparisons over rows gathered from the registry, sends one table and launches once; a
step that reaches items first resolves their sources together (``resolve``), commits
them, and sends the run rows that changed with the same upload path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from mmassembler.errors import SourceChangedError
from mmassembler.registry import Registry
from mmassembler.resolve import resolve
from mmassembler.runs import NewRequests
from mmassembler.step_inputs import check_windows, int_array
from mmkernels import layout as L
from mmkernels import ResidentTables, StepOp, StepOps, assemble_step_ref

logger = logging.getLogger("mmassembler")


class StepStats:
    """Counters of a ``StepCore`` since it was made."""

    __slots__ = ("steps", "resolving_steps", "first_contacts", "encoder_calls", "encoded_rows",
                 "cache_hits", "cache_misses", "registered", "removed")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class StepCore:
    """A registry of requests and the device tables and step ops that assemble their steps.

    ``backend`` is a resolved backend (``triton``, ``interpreter`` or ``torch``). Capacities:
    ``max_requests`` requests, ``max_runs`` runs and ``max_items`` items registered at once,
    ``max_tokens`` tokens a step.
    """

    def __init__(self, device: torch.device, *, backend: str, max_tokens: int, max_requests: int,
                 max_runs: int, max_items: int, check_stable: bool = False):
        self.device, self.backend = device, backend
        self.max_tokens, self.max_requests = max_tokens, max_requests
        self.registry = Registry(max_requests=max_requests, max_runs=max_runs, max_items=max_items)
        self.tables = ResidentTables(device, max_requests=max_requests, max_runs=max_runs)
        self._ops = None if backend == "torch" else StepOps(self.tables, interpreted=backend == "interpreter")
        self._bad = np.zeros((4, max_requests), bool)  # scratch of the window check
        self.stats = StepStats()
        self.check_stable = check_stable

    def op(self, *, hidden: int, ds_cols: int, dtype: torch.dtype, fused: bool,
           block_rows: int | None = None) -> StepOp | None:
        """The step op for an output width and mode (``None`` on the torch backend)."""
        if self._ops is None:
            return None
        return self._ops.get(hidden=hidden, ds_cols=ds_cols, dtype=dtype, fused=fused, block_rows=block_rows)

    # -- registration -----------------------------------------------------------------------
    def add(self, new: NewRequests) -> list[int]:
        """Register a batch of new requests (see ``Registry.add_many``); their handles."""
        handles = self.registry.add_many(new)
        self.stats.registered += len(handles)
        return handles

    def remove(self, handles) -> None:
        """Remove requests; what they held is let go of once the queued steps have run."""
        released = self.registry.remove_many(handles)
        self.stats.removed += len(handles)
        self.tables.retire(released)

    # -- a step -----------------------------------------------------------------------------
    def step(self, handles, prefix_lens, extend_lens, buffers: Callable, *, weight: torch.Tensor | None,
             op: StepOp | None, widths: tuple, encoders, cache, graph=None):
        """Assemble one step: request ``i`` (``handles[i]``) contributes prompt positions
        ``[prefix_lens[i], prefix_lens[i] + extend_lens[i])``. ``buffers(n)`` checks (and
        makes) the step's ``(out, deepstack_out, input_ids)`` for ``n`` tokens before
        anything changes; ``graph`` (a ``StepGraph``) replays instead of launching. Returns
        ``out`` (or the graph's output rows). Raises an ``AssemblyError`` before any write."""
        if self.check_stable:
            self._check_stable()
        h = int_array(handles, "handles")
        p = int_array(prefix_lens, "prefix_lens")
        e = int_array(extend_lens, "extend_lens")
        r = len(h)
        table = self.tables.staging_table()
        reg = self.registry
        # a step right after registration needs sources: straight to the slow path
        fits = not reg.fresh and len(p) == r == len(e) and r <= self.max_requests
        n = self._fill(table, h, p, e) if fits else None
        if n is not None and r and np.maximum.reduce(np.bincount(h)) > 1:
            n = None  # a handle twice: the slow path names it, as it does on any step
        if n is None or n > self.max_tokens:  # a bad window, or one that needs sources
            n = check_windows(h, p, e, reg, self.max_requests, self.max_tokens)
            out, deepstack_out, input_ids = buffers(n)
            q = p + e
            work = reg.needs_work(h, p, q)
            if len(work):
                self._resolve(work, h, p, q, encoders, cache, widths)
            reg.fresh = 0
            self._fill(table, h, p, e)
        else:
            out, deepstack_out, input_ids = buffers(n)
        self._flush()
        table[0, L.STEP_TOKENS], table[0, L.STEP_REQUESTS] = n, r
        self.stats.steps += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("step %d: %d requests, %d tokens", self.stats.steps, r, n)
        if graph is not None:
            if input_ids is not None and input_ids.data_ptr() != graph.input_ids.data_ptr():
                graph.input_ids[:n].copy_(input_ids, non_blocking=True)
            graph.replay()
            self.tables.end_step()
            return graph.out[:n]
        if op is None:
            assemble_step_ref(out, deepstack_out, input_ids, weight, self.registry.runs, table,
                              self.registry.item_src, self.registry.item_row0)
        else:
            self.tables.upload_step(r)
            op.launch(out, deepstack_out, input_ids, weight, n)
        self.tables.end_step()
        return out

    def _check_stable(self) -> None:
        """Debug: every held source read in place (a ``stable`` encoder's output) still has
        the version counter it had when read; a write in place raises before the step."""
        reg = self.registry
        slots = (reg.held & (reg.item_version >= 0)).nonzero()[0]
        if len(slots):
            now = np.array([t._version for t in reg.item_src[slots].tolist()], np.int64)
            bad = now != reg.item_version[slots]
            if True in bad:
                s = int(slots[bad.nonzero()[0][0]])
                raise SourceChangedError(
                    f"the stable encoder's output for item {reg.item_key[s]!r} was written in place while "
                    "the assembler holds it (a stable encoder must keep its outputs unchanged)",
                    item_key=reg.item_key[s])

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
        return None if True in bad else table.item(r + 1, L.STEP_BASE)

    def _resolve(self, work: np.ndarray, h, p, q, encoders, cache, widths) -> None:
        """Sources for items the windows ``work`` reach first; release items they passed."""
        reg = self.registry
        hw, pw, qw = h[work], p[work], q[work]
        ridx, rwin, iidx, iwin = reg.reached(hw)
        runs = reg.runs[ridx]
        hit = (runs[:, L.HOST_RUN_POS] < qw[rwin]) & (runs[:, L.HOST_RUN_END] > pw[rwin])
        slots = reg.unheld_among(runs[hit, L.HOST_RUN_ITEM], iidx)
        passed = iidx[reg.held[iidx] & (reg.item_end[iidx] <= pw[iwin])]
        request = np.empty(self.max_requests + 2, np.int64)
        request[h] = np.arange(len(h))  # handle -> its index in the step (distinct handles)
        found = resolve(reg, slots, request[reg.item_owner[slots]], encoders=encoders, cache=cache,
                        device=self.device, widths=widths)
        # every check has passed: commit (the changed runs' device rows go with the next flush)
        self.tables.retire(reg.set_sources(slots, found.sources, found.first_rows, found.entries, passed,
                                           ridx, found.versions))
        reg.update_ready(hw, pw, qw, ridx, rwin, iidx, iwin)
        st = self.stats
        st.resolving_steps += 1
        st.first_contacts += len(slots)
        st.encoder_calls += found.encoder_calls
        st.encoded_rows += found.encoded_rows
        st.cache_hits += found.hits
        st.cache_misses += found.misses

    def _flush(self) -> None:
        """Send the run rows registration or a source change made stale (one upload; the
        torch backend reads the host rows, so nothing goes up)."""
        if self.registry.has_dirty_runs:
            idx, rows = self.registry.take_dirty_runs()
            if self.backend != "torch":
                self.tables.write_runs(idx, rows)
