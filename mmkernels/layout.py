"""The resident tables' layout and kind codes, defined once (numpy only).

The step kernel (``mmkernels/kernels/step.py``), its launcher and its torch twin all read
these names, so a field never means two things. Every table is int64, row-major.

- Run table ``[max_runs, RUN_FIELDS]``: a request's runs, position-ordered and contiguous
  (``run_first .. run_end`` of the request). Positions ``[RUN_POS, RUN_END)`` take rows
  ``RUN_ROW + i`` of item slot ``RUN_ITEM``.
- Item table ``[max_items, ITEM_FIELDS]``: where an item's source lies, or ``KIND_NONE``.
  ``ITEM_OFF`` is the source's first element counted from the anchor of its dtype,
  ``ITEM_STRIDE`` its row stride in elements; ``ITEM_ALIGNED`` is 1 when both (and the
  anchor) are 16-byte multiples, so the kernel may use 16-byte loads.
- Step table ``[1 + max_requests + 1, STEP_FIELDS]``: row 0 holds the step's counts
  (``STEP_TOKENS``, ``STEP_REQUESTS``) read on the device; row ``1 + i`` request ``i``'s
  window; the row after the last request holds the token count as its ``STEP_BASE``.
  The kernel reads ``STEP_BASE``, ``STEP_PREFIX``, ``STEP_RUN_FIRST`` and ``STEP_RUN_END``.
  The other columns serve the host's check that a window needs no work: a request row is
  gathered whole from the registry, the window's prefix and stop are written beside its
  bounds, and ``READY_LO <= PREFIX <= STOP <= READY_HI`` (adjacent columns: one
  comparison of two shifted slices) plus ``PREFIX <= START_MAX`` hold.
"""

from __future__ import annotations

import numpy as np

RUN_POS, RUN_END, RUN_ROW, RUN_ITEM = 0, 1, 2, 3
RUN_FIELDS = 4

ITEM_OFF, ITEM_STRIDE, ITEM_KIND, ITEM_COLS, ITEM_ALIGNED = 0, 1, 2, 3, 4
ITEM_FIELDS = 8  # padded to 64 bytes: one item is one aligned line

# request rows: kernel fields, and host check fields (ready interval, start limit)
(STEP_BASE, STEP_READY_LO, STEP_PREFIX, STEP_STOP, STEP_READY_HI, STEP_START_MAX, STEP_RUN_FIRST,
 STEP_RUN_END) = range(8)
STEP_TOKENS, STEP_REQUESTS = 0, 1  # header row
STEP_FIELDS = 8  # 64 bytes a row

KIND_F32, KIND_F16, KIND_BF16 = 0, 1, 2  # a source's dtype: which anchor it is read from
KIND_NONE = -1  # an item slot with no source (unresolved or released)

VEC_ELEMENTS = {KIND_F32: 4, KIND_F16: 8, KIND_BF16: 8}  # elements in 16 bytes


def step_rows(num_requests: int) -> int:
    """Rows of a step table for ``num_requests`` requests (header + requests + end row)."""
    return num_requests + 2


def empty_items(n: int) -> np.ndarray:
    """An item table of ``n`` slots, none holding a source."""
    items = np.zeros((n, ITEM_FIELDS), dtype=np.int64)
    items[:, ITEM_KIND] = KIND_NONE
    return items
