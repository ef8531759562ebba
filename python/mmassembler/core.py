"""The back half both front doors share: registry, device tables, resolver and launcher.

``StepCore`` registers batches of requests (``add``), plans a step of windows over them
(``plan``: all host work) and runs it (``run``: the uploads and the launch, nothing
else), and removes requests (``remove``). The ``Assembler`` keeps one for a model; the
stateless ``assemble`` and the segment ops are first contacts on a pooled one (``pool``).

A plan fills the step table from the windows (``fill``) and meets only the windows that
fail their bounds, item by item in Python (``_meet``): a new request's first window, a
window that reaches an item first or passes a held one. Their items are resolved
together (``resolve``), every check passes before anything changes, then the requests'
sources, bounds and changed run rows are committed and staged. A step whose windows
need nothing is the steady step: the fill, one table copy and one launch.
"""

from __future__ import annotations

import bisect
import logging
import operator

import numpy as np
import torch

from mmassembler.errors import BatchShapeError, CapacityError, ChunkWindowError, SourceChangedError, \
    UnknownHandleError
from mmassembler.fill import PYTHON_FILL_MAX, NumpyFill, fill_python, write_rows
from mmassembler.registry import Registry
from mmassembler.resolve import resolve
from mmassembler.runs import NO_LIMIT, NewRequests
from mmassembler.step_inputs import StepSpec, check_step_buffers, int_array
from mmkernels import layout as L
from mmkernels import ResidentTables, StepOp, StepOps, assemble_step_ref

logger = logging.getLogger("mmassembler")

_INTS = {int}
_NONE_ROW = (0, 0, L.KIND_NONE, 0, 0)  # the source fields of a run whose item holds none


class StepStats:
    """Counters of a ``StepCore`` since it was made."""

    __slots__ = ("steps", "resolving_steps", "first_contacts", "encoder_calls", "encoded_rows",
                 "cache_hits", "cache_misses", "registered", "removed")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class StepPlan:
    """A planned step: what ``run`` sends and launches (``StepCore.plan``). A plan runs
    once, and only while it is its core's latest plan."""

    __slots__ = ("core", "serial", "num_tokens", "num_requests", "out", "deepstack_out", "input_ids",
                 "weight", "op", "graph", "retired", "windows", "twin")

    def __repr__(self) -> str:
        return f"StepPlan({self.num_requests} requests, {self.num_tokens} tokens)"


class StepCore:
    """A registry of requests and the device tables and step ops that assemble their steps.

    ``backend`` is a resolved backend (``triton``, ``interpreter`` or ``torch``). Capacities:
    ``max_requests`` requests, ``max_runs`` runs and ``max_items`` items registered at once,
    ``max_tokens`` tokens a step. Every table is made here; a step allocates none.
    """

    def __init__(self, device: torch.device, *, backend: str, max_tokens: int, max_requests: int,
                 max_runs: int, max_items: int, check_stable: bool = False,
                 tables: ResidentTables | None = None, ops: StepOps | None = None):
        self.device, self.backend = device, backend
        self.max_tokens, self.max_requests = max_tokens, max_requests
        self.registry = Registry(max_requests=max_requests, max_runs=max_runs, max_items=max_items)
        if tables is None:
            tables = ResidentTables(device, max_requests=max_requests, max_runs=max_runs)
            ops = StepOps(tables, interpreted=backend == "interpreter")
        self.tables = tables
        self._ops = None if backend == "torch" else ops
        self._numpy_fill = NumpyFill(max_requests)
        self.stats = StepStats()
        self.check_stable = check_stable
        self._serial = 0  # plans made
        self._unrun: StepPlan | None = None  # the latest plan, until it runs
        self._touched: list = []  # requests the unrun plan staged rows for
        self._carry: list = []  # what an abandoned plan retired, for the next run

    def op(self, *, hidden: int, ds_cols: int, dtype: torch.dtype, fused: bool,
           block_rows: int | None = None) -> StepOp | None:
        """The step op for an output width and mode (``None`` on the torch backend)."""
        if self._ops is None:
            return None
        return self._ops.get(hidden=hidden, ds_cols=ds_cols, dtype=dtype, fused=fused, block_rows=block_rows)

    # -- registration -----------------------------------------------------------------------
    def add(self, new: NewRequests, built: list | None = None) -> list[int]:
        """Register a batch of new requests (see ``Registry.add``); their handles."""
        handles = self.registry.add(new, built)
        self.stats.registered += len(handles)
        return handles

    def remove(self, handles) -> None:
        """Remove requests; what they held is let go of once the queued steps have run,
        and the planned one too when a plan is waiting to run (it may read them)."""
        released = self.registry.remove(handles)
        self.stats.removed += len(handles)
        if self._unrun is not None:  # the plan may read them: kept until it has run
            self._unrun.retired = self._unrun.retired + released
        else:
            self.tables.retire(released)

    # -- plan -------------------------------------------------------------------------------
    def plan(self, handles, prefix_lens, extend_lens, *, spec: StepSpec, op: StepOp | None,
             weight: torch.Tensor | None, input_ids: torch.Tensor | None, out: torch.Tensor | None,
             deepstack_out: torch.Tensor | None, encoders, cache, graph=None) -> StepPlan:
        """All host work of a step: request ``i`` (``handles[i]``) contributes prompt
        positions ``[prefix_lens[i], prefix_lens[i] + extend_lens[i])``. Checks the
        windows and the buffers (``spec``; the output is made in fused mode when not
        given), resolves the sources of items the windows reach first and stages the
        step's tables. Raises an ``AssemblyError`` before anything changes."""
        if self._unrun is not None:
            self._abandon()
        if self.check_stable:
            self._check_stable()
        self._serial += 1
        serial = self._serial
        reg = self.registry
        recs = reg.recs
        table = self.tables.staging_table()
        r = len(handles)
        if r <= PYTHON_FILL_MAX and type(handles) is list and type(prefix_lens) is list \
                and type(extend_lens) is list:
            hl, pl, el = handles, prefix_lens, extend_lens
            if set(map(type, hl + pl + el)) != _INTS and (hl or pl or el):
                hl, pl, el = (int_array(handles, "handles").tolist(), int_array(prefix_lens, "prefix_lens").tolist(),
                              int_array(extend_lens, "extend_lens").tolist())
            arrays = None
        else:
            h, p, e = int_array(handles, "handles"), int_array(prefix_lens, "prefix_lens"), \
                int_array(extend_lens, "extend_lens")
            if r <= PYTHON_FILL_MAX:
                hl, pl, el = h.tolist(), p.tolist(), e.tolist()
                arrays = None
            else:
                hl = pl = el = None
                arrays = (h, p, e)
        if (len(pl) if arrays is None else len(arrays[1])) != r or (
                len(el) if arrays is None else len(arrays[2])) != r:
            raise BatchShapeError(f"handles, prefix_lens and extend_lens have lengths {r}, {len(prefix_lens)}, "
                                  f"{len(extend_lens)}; they must be equal")
        if r > self.max_requests:
            raise CapacityError(f"{r} requests in one step exceed max_requests {self.max_requests}")
        if arrays is None:
            fail, dup = fill_python(recs, reg.max_requests, hl, pl, el, serial)
        else:
            if reg.stale:
                reg.sync_req()
            fail, dup = self._numpy_fill.fill(table, reg.req, *arrays)
            if fail:
                hl, pl, el = arrays[0].tolist(), arrays[1].tolist(), arrays[2].tolist()
        work = self._check_failing(fail, dup, hl, pl, el, recs) if fail else None
        if arrays is None:
            n = sum(el)
        else:
            n = table.item(r + 1, L.STEP_BASE)
        if n > self.max_tokens:
            self._too_many_tokens(arrays[2].tolist() if el is None else el, hl if hl is not None else
                                  arrays[0].tolist(), n)
        out, deepstack_out, input_ids = check_step_buffers(spec, n, out, deepstack_out, input_ids, weight,
                                                           graph is not None)
        if graph is not None:
            graph.prepare(weight)  # captured again here, between steps, if the weight moved
        retired = self._meet(work, encoders, cache, spec.widths) if work else []
        if arrays is None:
            write_rows(table, recs, hl, pl, el)
        else:
            if fail:
                table[[1 + i for i in fail], L.STEP_RUN_FIRST:L.STEP_RUN_END + 1] = [
                    (recs[hl[i]].run0, recs[hl[i]].run0 + recs[hl[i]].nruns) for i in fail]
            table[0, L.STEP_TOKENS], table[0, L.STEP_REQUESTS] = n, r
        plan = StepPlan()
        plan.core, plan.serial, plan.num_tokens, plan.num_requests = self, serial, n, r
        plan.out, plan.deepstack_out, plan.input_ids, plan.weight = out, deepstack_out, input_ids, weight
        plan.op, plan.graph, plan.retired = op, graph, retired
        plan.windows = (hl, pl, el) if hl is not None else arrays
        plan.twin = self._twin_tables(table, plan.windows[0]) if op is None and graph is None else None
        self._unrun = plan
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("plan %d: %d requests, %d tokens, %d windows met", serial, r, n, len(fail))
        return plan

    def _check_failing(self, fail: list, dup, hl, pl, el, recs) -> list:
        """Check the failing windows (handles, repeats, bounds, prompt); the ones with tokens
        as ``(index, request, p, q)``. Raises the first bad one's typed error."""
        top = self.registry.max_requests
        got = [recs[h] if type(h) is int and 0 < h <= top else None for h in [hl[i] for i in fail]]
        if None in got:
            i = fail[got.index(None)]
            raise UnknownHandleError(f"handle {hl[i]} is not a registered request", request=i)
        if dup is not None:
            raise BatchShapeError(f"handle {hl[dup]} appears twice in one step", request=dup)
        work = [(i, rec, pl[i], pl[i] + el[i]) for i, rec in zip(fail, got)]
        for i, rec, p, q in work:
            if p < 0 or q < p or q > rec.prompt:
                raise ChunkWindowError(f"window [{p}, {q}) of handle {hl[i]} is negative or runs past its "
                                       f"prompt of {rec.prompt} positions", request=i)
        return [w for w in work if w[3] > w[2]]

    def _too_many_tokens(self, el: list, hl: list, n: int) -> None:
        for i, e in enumerate(el):
            if e > self.max_tokens:
                raise CapacityError(f"window of {e} tokens of handle {hl[i]} exceeds max_tokens {self.max_tokens}",
                                    request=i)
        raise CapacityError(f"{n} tokens in one step exceed max_tokens {self.max_tokens}")

    def _meet(self, work: list, encoders, cache, widths: tuple) -> list:
        """Resolve the sources of the items the windows ``work`` reach first, let go of the
        held sources they passed, and commit: sources, bounds, changed run rows staged.
        Returns the released sources (kept until the step has run). A few operations a
        window and a few an item, no array operation but one write of the changed
        requests' bounds. Items and runs are numbered in their batch (``registry.Batch``)."""
        want: list = []  # (window, request, item) reached first
        reached: list = [None] * len(work)  # (request, first run reached, end run, its wanted items)
        passed = []  # (request, items passed while holding a source)
        for x, (i, rec, p, q) in enumerate(work):
            n, b = rec.nruns, rec.batch
            srcs, ra = b.srcs, rec.ra
            z = ra + n
            if n:
                rend, rpos = b.rend, b.rpos
                k0 = ra if p < rend[ra] else bisect.bisect_right(rend, p, ra, z)
                k1 = z if q > rpos[z - 1] else bisect.bisect_left(rpos, q, ra, z)
            else:
                k0 = k1 = ra
            if rec.simple:
                d = rec.a - ra
                new = [(i, rec, k + d) for k in range(k0, k1) if srcs[k + d] is None]
            else:
                a = rec.a
                new = [(i, rec, a + j) for j in dict.fromkeys(b.ritem[k0:k1]) if srcs[a + j] is None]
            if new:
                want += new
            if rec.held:
                iend = b.iend
                gone = [j for j in rec.held if iend[j] <= p]
                if gone:
                    passed.append((rec, gone))
            reached[x] = (rec, k0, k1, new)
        if want:
            found = resolve([w[0] for w in want], [w[1].batch.keys[w[2]] for w in want],
                            [w[1].batch.mods[w[2]] for w in want], [w[1].batch.rows[w[2]] for w in want],
                            [w[1].batch.embs[w[2]] for w in want], [w[1].batch.objs[w[2]] for w in want],
                            encoders=encoders, cache=cache, device=self.device, widths=widths)
            sources = found.sources
            if self.check_stable:  # the values of sources read in place, for the debug check
                sources = [s if s[3] < 0 else (*s, s[0][s[1]:s[1] + w[1].batch.rows[w[2]]].clone())
                           for s, w in zip(sources, want)]
        # every check has passed: commit
        retired = []
        changed: dict = {}  # request -> items whose source was let go
        for rec, gone in passed:
            srcs, held = rec.batch.srcs, rec.held
            for j in gone:
                retired.append(srcs[j][0])
                srcs[j] = None
                del held[j]
            changed[rec] = gone
        if want:
            for (_, rec, j), s in zip(want, sources):
                rec.batch.srcs[j] = s
                rec.held[j] = None
            self._count(found, len(want))
        chunks = []  # (first run slot, request, first run, end run) whose device rows changed
        for x, (rec, k0, k1, new) in enumerate(reached):
            # bounds: ready from the end of the last unheld run before the window, to the start
            # of the first unheld run after it (or the prompt's end); released before the end of
            # the held item that ends first
            b, n, ra, simple = rec.batch, rec.nruns, rec.ra, rec.simple
            srcs, ritem, z, a, d = b.srcs, b.ritem, ra + n, rec.a, rec.a - ra
            k = k0 - 1
            while k >= ra and srcs[k + d if simple else a + ritem[k]] is not None:
                k -= 1
            lo = b.rend[k] if k >= ra else 0
            k = k1
            while k < z and srcs[k + d if simple else a + ritem[k]] is not None:
                k += 1
            prompt = rec.prompt
            hi = b.rpos[k] if k < z and b.rpos[k] < prompt else prompt
            held = rec.held
            if not held:
                smax = NO_LIMIT
            elif simple:  # an item ends after the ones before it
                smax = b.iend[min(held)] - 1
            else:
                smax = min(map(b.iend.__getitem__, held)) - 1
            rec.lo, rec.hi, rec.smax = lo, hi, smax
            if rec.fresh:
                chunks.append((rec.run0, rec, ra, z))
                rec.fresh = False
            elif new or rec in changed:
                ka, kb = _run_span(rec, [w[2] for w in new] + changed.get(rec, []))
                chunks.append((rec.run0 + ka - ra, rec, ka, kb))
        self.registry.stale.update(dict.fromkeys([w[0].handle for w in reached]))
        if self.backend != "torch" and chunks:
            self._stage(chunks)
        self._touched = [w[0] for w in reached]
        return retired

    def _count(self, found, items: int) -> None:
        st = self.stats
        st.resolving_steps += 1
        st.first_contacts += items
        st.encoder_calls += found.encoder_calls
        st.encoded_rows += found.encoded_rows
        st.cache_hits += found.hits
        st.cache_misses += found.misses

    def _stage(self, chunks: list) -> None:
        """Stage the device rows of run ranges ``(first run slot, request, ka, kb)`` (batch
        run indices): ranges that meet are packed together, one copy each. A run's row is
        its positions and its item's source entry moved to the run's first row."""
        if len(chunks) > 1:
            chunks.sort(key=_FIRST)
        stage = self.tables.stage_runs
        start = end = None
        vals: list = []
        for first, rec, ka, kb in chunks:
            if first != end:
                if vals:
                    stage(start, vals)
                    vals = []
                start = first
            end = first + kb - ka
            b = rec.batch
            srcs, rpos, rend = b.srcs, b.rpos, b.rend
            if rec.simple:
                d = rec.a - rec.ra
                for k in range(ka, kb):
                    s = srcs[k + d]
                    vals += (rpos[k], rend[k], *(_NONE_ROW if s is None else s[2]), 0)
                continue
            ritem, rrow, a = b.ritem, b.rrow, rec.a
            for k in range(ka, kb):
                s = srcs[a + ritem[k]]
                if s is None:
                    vals += (rpos[k], rend[k], *_NONE_ROW, 0)
                else:
                    off, stride, kind, cols, aligned = s[2]
                    vals += (rpos[k], rend[k], off + rrow[k] * stride, stride, kind, cols, aligned, 0)
        stage(start, vals)

    def _abandon(self) -> None:
        """A new plan before the last one ran: the rows that plan staged were never sent,
        so its requests meet the next step as new again (their rows are staged again)."""
        reg = self.registry
        for rec in self._touched:
            if reg.recs[rec.handle] is rec:
                reg.forget_upload(rec)
        self._carry += self._unrun.retired
        self._unrun, self._touched = None, []

    # -- run --------------------------------------------------------------------------------
    def run(self, plan: StepPlan) -> torch.Tensor:
        """Send what ``plan`` staged and launch it (or replay the graph): nothing else.
        Returns the step's output."""
        if plan is not self._unrun:
            raise BatchShapeError(f"{plan!r} is not the latest plan of this assembler, or it already ran: "
                                  "run each plan once, before the next plan is made")
        self._unrun = None
        self._touched = []
        tables = self.tables
        retired = plan.retired
        if self._carry:
            retired, self._carry = retired + self._carry, []
        n = plan.num_tokens
        self.stats.steps += 1
        graph = plan.graph
        if graph is not None:
            tables.send_runs()
            ids = plan.input_ids
            if ids is not None and ids.data_ptr() != graph.input_ids.data_ptr():
                graph.input_ids[:n].copy_(ids, non_blocking=True)
            graph.replay()
            tables.end_step(retired)
            return graph.out[:n]
        out = plan.out
        if plan.op is None:
            assemble_step_ref(plan.out, plan.deepstack_out, plan.input_ids, plan.weight, *plan.twin)
        else:
            tables.send_runs()
            tables.upload_step(plan.num_requests)
            plan.op.launch(out, plan.deepstack_out, plan.input_ids, plan.weight, n)
        tables.end_step(retired)
        return out

    def _twin_tables(self, step_table: np.ndarray, hl) -> tuple:
        """The torch backend: host tables for the kernel's twin, built in the plan (the
        sources it reads are held by the plan, whatever changes before it runs)."""
        if type(hl) is not list:
            hl = hl.tolist()
        recs = self.registry.recs
        r = len(hl)
        table = step_table[:r + 2].copy()
        runs, sources, first_rows = [], [], []
        for i, h in enumerate(hl):
            rec = recs[h]
            b = rec.batch
            table[1 + i, L.STEP_RUN_FIRST] = len(runs)
            d, simple = rec.a - rec.ra, rec.simple
            for k in range(rec.ra, rec.ra + rec.nruns):
                s = b.srcs[k + d if simple else rec.a + b.ritem[k]]
                runs.append((b.rpos[k], b.rend[k], 0 if simple else b.rrow[k], len(sources)))
                sources.append(None if s is None else s[0])
                first_rows.append(0 if s is None else s[1])
            table[1 + i, L.STEP_RUN_END] = len(runs)
        return np.array(runs, np.int64).reshape(-1, 4), table, sources, np.array(first_rows, np.int64)

    # -- the check_stable debug option ------------------------------------------------------
    def _check_stable(self) -> None:
        """Debug: every held source read in place (a ``stable`` encoder's output) still has
        the version counter and the values it had when read; a write in place (however it
        was made: through ``.data`` and ``.numpy()`` too) raises before the step."""
        for rec in self.registry.recs:
            if rec is None or not rec.held:
                continue
            b = rec.batch
            for j in rec.held:
                s = b.srcs[j]
                if s[3] < 0:
                    continue
                t = s[0]
                now = t[s[1]:s[1] + b.rows[j]]
                if t._version != s[3] or (len(s) > 4 and not _same_bits(now, s[4])):
                    raise SourceChangedError(
                        f"the stable encoder's output for item {b.keys[j]!r} was written in place while "
                        "the assembler holds it (a stable encoder must keep its outputs unchanged)",
                        item_key=b.keys[j])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.itemsize == 2:
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


_FIRST = operator.itemgetter(0)


def _run_span(rec, items: list) -> tuple[int, int]:
    """The run range ``[ka, kb)`` (batch run indices) covering every run of ``items``
    (batch item indices) of ``rec``."""
    if rec.simple:
        d = rec.ra - rec.a
        return min(items) + d, max(items) + 1 + d
    mine = {j - rec.a for j in items}
    ritem = rec.batch.ritem
    ks = [k for k in range(rec.ra, rec.ra + rec.nruns) if ritem[k] in mine]
    return ks[0], ks[-1] + 1
