"""The segment ops' tables: a batch's segments as the runs of one request that spans the
output, each run row saying where its source lies and whether 16-byte loads are safe."""

import numpy as np
import torch

from mmkernels import layout as L
from mmkernels.ops import segment_runs
from mmkernels.tables import anchors_on


def _tables(sources, segs, hidden, rows):
    anchors = anchors_on(torch.device("cpu"))
    return segment_runs(np.array(segs, np.int64), sources, hidden), anchors


def test_run_rows_locate_sources_and_flag_16_byte_loads():
    base = torch.zeros(8, 40, dtype=torch.bfloat16)
    sources = [base[:, :32],  # row stride 80 bytes, first row aligned
               base[:, 1:33],  # starts 2 bytes in: no 16-byte loads
               torch.zeros(4, 36)[:, :32],  # f32, row stride 144 bytes
               torch.zeros(4, 35)[:, :32]]  # f32, row stride 140 bytes: no 16-byte loads
    segs = [(0, 1, 0, 2), (1, 0, 2, 1), (2, 3, 4, 1), (3, 0, 5, 1)]  # row 3 is text
    runs, anchors = _tables(sources, segs, 32, 7)
    assert runs[:, L.RUN_ALIGNED].tolist() == [1, 0, 1, 0]
    assert runs[:, L.RUN_POS].tolist() == [0, 2, 4, 5] and runs[:, L.RUN_END].tolist() == [2, 3, 5, 6]
    assert runs[:, L.RUN_KIND].tolist() == [L.KIND_BF16, L.KIND_BF16, L.KIND_F32, L.KIND_F32]
    bf16_anchor, f32_anchor = anchors[L.KIND_BF16].data_ptr(), anchors[L.KIND_F32].data_ptr()
    # run 0 reads row 1 of source 0: its element offset from the bf16 anchor
    assert runs[0, L.RUN_OFF] == (sources[0].data_ptr() - bf16_anchor) // 2 + 40
    assert runs[2, L.RUN_OFF] == (sources[2].data_ptr() - f32_anchor) // 4 + 3 * 36
    assert runs[:, L.RUN_STRIDE].tolist() == [40, 40, 36, 35]


def test_deepstack_columns_at_an_unaligned_width_stop_16_byte_loads():
    src = torch.zeros(4, 24, dtype=torch.bfloat16)  # hidden 12 bf16 = 24 bytes
    table, _ = _tables([src], [(0, 0, 0, 4)], 12, 4)
    assert table[0, L.RUN_ALIGNED] == 0
    table, _ = _tables([src], [(0, 0, 0, 4)], 8, 4)  # 16 bytes
    assert table[0, L.RUN_ALIGNED] == 1
