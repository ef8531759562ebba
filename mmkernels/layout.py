"""The resident tables' layout and kind codes, defined once (numpy only).

The step kernel (``mmkernels/kernels/step.py``), its launcher and its torch twin all read
these names, so a field never means two things. Every table is int64, row-major.

- Run table ``[max_runs, RUN_FIELDS]`` (device): a request's runs, position-ordered and
  contiguous (``run_first .. run_end`` of the request). Positions ``[RUN_POS, RUN_END)``
  read consecutive rows of one source: position ``RUN_POS`` reads the row at element
  ``RUN_OFF`` counted from the anchor of the source's dtype (``RUN_KIND``), later ones
  ``RUN_STRIDE`` elements apart; ``RUN_COLS`` is the source's width, ``RUN_ALIGNED`` 1
  when offset, stride (and the anchor) are 16-byte multiples, so 16-byte loads are safe.
  The source is folded into each run row, so the kernel reaches it in one load round; a
  run whose item holds no source has ``KIND_NONE`` (the host never lets a window read it).
- Host run rows ``[max_runs, HOST_RUN_FIELDS]`` (the registry's mirror): positions
  ``[HOST_RUN_POS, HOST_RUN_END)`` take rows ``HOST_RUN_ROW + i`` of item slot
  ``HOST_RUN_ITEM``. ``device_runs`` turns them and their items' sources into device rows.
- Source entry ``[SOURCE_FIELDS]``: where an item's embedding lies (``source_entry`` in
  ``mmkernels/tables.py``), or ``NO_SOURCE``.
- Step table ``[step_rows(max_requests), STEP_FIELDS]``: row 0 holds the step's counts
  (``STEP_TOKENS``, ``STEP_REQUESTS``) read on the device; row ``1 + i`` request ``i``'s
  window; the row after the last request holds the token count as its ``STEP_BASE``.
  The kernel reads ``STEP_BASE``, ``STEP_PREFIX``, ``STEP_RUN_FIRST`` and ``STEP_RUN_END``.
  The other columns serve the host's check that a window needs no work: a request row is
  gathered whole from the registry, the window's prefix and stop are written beside its
  bounds, and ``READY_LO <= PREFIX <= STOP <= READY_HI`` (adjacent columns: one
  comparison of two shifted slices) plus ``PREFIX <= START_MAX`` hold. The table has at
  least ``MIN_REQUEST_ROWS`` request rows, so the kernel may read the first bases before
  it knows how many requests the step has.
"""

from __future__ import annotations

import numpy as np

RUN_POS, RUN_END, RUN_OFF, RUN_STRIDE, RUN_KIND, RUN_COLS, RUN_ALIGNED = range(7)
RUN_FIELDS = 8  # padded to 64 bytes: one run is one aligned line

HOST_RUN_POS, HOST_RUN_END, HOST_RUN_ROW, HOST_RUN_ITEM = range(4)
HOST_RUN_FIELDS = 4

SOURCE_OFF, SOURCE_STRIDE, SOURCE_KIND, SOURCE_COLS, SOURCE_ALIGNED = range(5)
SOURCE_FIELDS = 5

# request rows: kernel fields, and host check fields (ready interval, start limit)
(STEP_BASE, STEP_READY_LO, STEP_PREFIX, STEP_STOP, STEP_READY_HI, STEP_START_MAX, STEP_RUN_FIRST,
 STEP_RUN_END) = range(8)
STEP_TOKENS, STEP_REQUESTS = 0, 1  # header row
STEP_FIELDS = 8  # 64 bytes a row
MIN_REQUEST_ROWS = 128  # >= the keys a search loads per round (StepConfig.search_keys)

KIND_F32, KIND_F16, KIND_BF16 = 0, 1, 2  # a source's dtype: which anchor it is read from
KIND_NONE = -1  # no source (an unresolved or released item)
NO_SOURCE = (0, 0, KIND_NONE, 0, 0)


def step_rows(max_requests: int) -> int:
    """Rows of a step table for up to ``max_requests`` requests (header, requests, end row)."""
    return max(max_requests, MIN_REQUEST_ROWS) + 2


def loads_aligned(offset_bytes, stride_bytes, hidden_bytes):
    """Whether a source may be read with 16-byte loads: its first row's offset from a
    16-byte aligned anchor, its row stride and the deepstack columns' start (column
    ``hidden``) are all 16-byte multiples (ints or arrays of them)."""
    return (offset_bytes % 16 == 0) & (stride_bytes % 16 == 0) & (hidden_bytes % 16 == 0)


def device_runs(host_runs: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Device run rows of ``host_runs`` ``[n, HOST_RUN_FIELDS]`` whose items' sources are
    ``sources`` ``[n, SOURCE_FIELDS]`` (one entry per run)."""
    rows = np.zeros((len(host_runs), RUN_FIELDS), np.int64)
    rows[:, RUN_POS] = host_runs[:, HOST_RUN_POS]
    rows[:, RUN_END] = host_runs[:, HOST_RUN_END]
    rows[:, RUN_OFF] = sources[:, SOURCE_OFF] + host_runs[:, HOST_RUN_ROW] * sources[:, SOURCE_STRIDE]
    rows[:, RUN_STRIDE] = sources[:, SOURCE_STRIDE]
    rows[:, RUN_KIND] = sources[:, SOURCE_KIND]
    rows[:, RUN_COLS] = sources[:, SOURCE_COLS]
    rows[:, RUN_ALIGNED] = sources[:, SOURCE_ALIGNED]
    return rows
