"""Filling a step's table from its windows, and finding the windows that need work.

A window ``[p, q)`` of a registered request needs no work when ``lo <= p <= q <= hi``
and ``p <= smax`` (``registry.RequestState``): every item it reaches holds a source and
no held source has been passed. Both fills check every window against those bounds and
report the ones that fail (unknown handles, repeated handles and bad windows fail too);
only those cost Python work in the step (``core.StepCore._meet``).

Two fills, one table: ``fill_python`` for steps of a few windows (a few Python operations
a window, no array operation: a numpy call on a tiny array costs more than the loop) and
``NumpyFill`` for many windows (a fixed number of array operations over the bounds
table ``Registry.req``, whatever the windows' number). ``PYTHON_FILL_MAX`` is where the
second gets cheaper (``python -m bench.profile_resident --fill``); the tests hold both to
the same tables and the same failing windows.
"""

from __future__ import annotations

import numpy as np

from mmkernels import layout as L
from mmkernels import write_step_table

PYTHON_FILL_MAX = 24  # windows up to which the Python fill is the cheaper one (see the module doc)
_INTS = {int}


def fill_python(recs: list, max_requests: int, hl: list, pl: list, el: list,
                serial: int) -> tuple[list, int | None]:
    """Check the windows ``(hl[i], pl[i], el[i])`` (Python ints) against their requests'
    bounds; ``(failing windows, first repeated window or None)``. Marks each request seen
    at ``serial`` (a repeated handle fails). The table is written by ``write_rows`` once
    the failing windows are settled."""
    fail: list = []
    dup = None
    for i, (h, p, e) in enumerate(zip(hl, pl, el)):
        rec = recs[h] if 0 < h <= max_requests else None
        if rec is None:
            fail.append(i)
            continue
        if rec.seen == serial:
            if dup is None:
                dup = i
            fail.append(i)
            continue
        rec.seen = serial
        q = p + e
        if not (rec.lo <= p <= q <= rec.hi and p <= rec.smax):
            fail.append(i)
    return fail, dup


def write_rows(table: np.ndarray, recs: list, hl: list, pl: list, el: list) -> int:
    """Write the step table for windows whose requests are all known (``write_step_table``:
    one packing call); the step's token count."""
    windows = []
    base = 0
    for h, p, e in zip(hl, pl, el):
        rec = recs[h]
        windows += (base, p, rec.run0, rec.run0 + rec.nruns)
        base += e
    write_step_table(table, base, windows)
    return base


class NumpyFill:
    """Scratch of ``fill_numpy`` for a registry of ``max_requests`` requests."""

    def __init__(self, max_requests: int):
        self.bad = np.zeros((5, max_requests), bool)  # [check, window]: contiguous per check
        self.mark = np.zeros(max_requests + 2, np.int64)  # handle -> its last window (repeats)
        self.ar = np.arange(max_requests, dtype=np.int64)

    def fill(self, table: np.ndarray, req: np.ndarray, h: np.ndarray, p: np.ndarray,
             e: np.ndarray) -> tuple[list, int | None]:
        """Write the windows' rows of the step table (each request's bounds gathered from
        ``req``; a bad handle clips to a sentinel row) and check them all with a fixed
        number of array operations; ``(failing windows, first repeated window or None)``.
        Failing windows' run columns are rewritten once they are settled."""
        r = len(h)
        rows = table[1:r + 1]
        req.take(h, 0, rows, "clip")
        rows[:, L.STEP_PREFIX] = p
        np.add(p, e, out=rows[:, L.STEP_STOP])
        np.add.accumulate(e, out=table[2:r + 2, L.STEP_BASE])  # row 1's base is 0 (gathered)
        bad = self.bad[:, :r]
        # READY_LO <= PREFIX <= STOP <= READY_HI and PREFIX <= START_MAX, and each handle once
        np.greater(rows[:, L.STEP_READY_LO:L.STEP_READY_HI].T, rows[:, L.STEP_PREFIX:L.STEP_READY_HI + 1].T,
                   out=bad[:3])
        np.greater(rows[:, L.STEP_PREFIX], rows[:, L.STEP_START_MAX], out=bad[3])
        ar = self.ar[:r]
        self.mark.put(h, ar, mode="clip")
        np.not_equal(self.mark.take(h, mode="clip"), ar, out=bad[4])
        if True not in bad:
            return [], None
        dup = None
        if True in bad[4]:  # name the first window whose handle came before (as fill_python)
            seen: set = set()
            for dup, x in enumerate(h.tolist()):
                if x in seen:
                    break
                seen.add(x)
        return bad.any(0).nonzero()[0].tolist(), dup
