"""The device tables (``mmkernels.tables``): the step table's layout, run rows staged in the
step's persistent buffer and sent by range, and the staging ring."""

import numpy as np
import torch

from mmkernels import layout as L
from mmkernels.tables import STAGING_RING, ResidentTables, write_step_table


def test_the_step_table_holds_header_windows_and_end_row():
    table = np.zeros((8, L.STEP_FIELDS), np.int64)
    write_step_table(table, 9, [0, 3, 4, 6, 5, 0, 6, 6])
    assert table[0, L.STEP_TOKENS] == 9 and table[0, L.STEP_REQUESTS] == 2
    assert (table[1, L.STEP_BASE], table[1, L.STEP_PREFIX], table[1, L.STEP_RUN_FIRST], table[1, L.STEP_RUN_END]) \
        == (0, 3, 4, 6)
    assert (table[2, L.STEP_BASE], table[2, L.STEP_PREFIX]) == (5, 0)
    assert table[3, L.STEP_BASE] == 9  # the end row


def test_staged_run_rows_are_sent_to_their_slots_in_order():
    t = ResidentTables(torch.device("cpu"), max_requests=2, max_runs=8)
    t.staging_table()
    rows = [[k, k + 1, 10 * k, 4, L.KIND_F32, 4, 1, 0] for k in range(3)]
    t.stage_runs(2, [v for r in rows for v in r])  # a flat list (packed)
    t.stage_runs(6, np.array(rows[:1], np.int64))  # an array
    t.send_runs()
    runs = t.runs.numpy()
    assert runs[2:5].tolist() == rows and runs[6].tolist() == rows[0]
    assert (runs[[0, 1, 5, 7], L.RUN_KIND] == L.KIND_NONE).all()  # untouched


def test_rows_past_the_persistent_buffer_go_up_from_a_buffer_of_their_own():
    t = ResidentTables(torch.device("cpu"), max_requests=2, max_runs=8)
    t._stage_rows = 2  # a small persistent buffer
    t.staging_table()
    rows = np.arange(5 * L.RUN_FIELDS, dtype=np.int64).reshape(5, L.RUN_FIELDS)
    t.stage_runs(1, rows)
    t.send_runs()
    assert t.runs.numpy()[1:6].tolist() == rows.tolist()


def test_the_staging_ring_moves_on_and_a_new_step_starts_empty():
    t = ResidentTables(torch.device("cpu"), max_requests=2, max_runs=8)
    slots = []
    for _ in range(STAGING_RING + 2):
        t.staging_table()
        t.stage_runs(0, [0] * L.RUN_FIELDS)
        slots.append(t.slot)
        t.end_step()
    assert slots[:STAGING_RING] == list(range(STAGING_RING)) and slots[STAGING_RING] == 0
    t.staging_table()
    assert t._chunks == []  # what an unsent step staged is dropped with it
