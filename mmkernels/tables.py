"""Device-resident tables of the step kernel: runs (with their sources) and the step's windows.

Run rows are written when they change (a request's first window, a source resolved or
released), staged in the step's persistent pinned buffer and sent with one driver copy per
contiguous range; a step in steady state sends only its step table: one non-blocking
copy from a persistent pinned buffer. Sources are
addressed from fixed per-dtype anchors, so a run row stays valid across steps and a CUDA
graph captured once keeps reading the right rows. Layout: ``mmkernels/layout.py``.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading

import numpy as np
import torch

from mmkernels import layout as L

KIND_OF_DTYPE = {torch.float32: L.KIND_F32, torch.float16: L.KIND_F16, torch.bfloat16: L.KIND_BF16}
SUPPORTED_DTYPES = tuple(KIND_OF_DTYPE)  # of sources, outputs and weights: defined here once
logger = logging.getLogger(__name__)

_anchors: dict = {}  # device -> its fixed per-dtype anchors
_anchors_lock = threading.Lock()


def anchors_on(device: torch.device) -> list[torch.Tensor]:
    """The fixed f32/f16/bf16 anchors of ``device`` (16-byte aligned allocations, kept for
    the process): sources are addressed in elements from the anchor of their dtype, a typed
    pointer that keeps the alignment the compiler needs for 16-byte loads."""
    found = _anchors.get(device)
    if found is None:
        with _anchors_lock:
            found = _anchors.setdefault(device, [torch.empty(16, dtype=dt, device=device)
                                                 for dt in KIND_OF_DTYPE])
    return found


_anchor_addr: dict = {}  # device -> kind code -> its anchor's address


def anchor_addresses(device: torch.device) -> dict[int, int]:
    """Kind code -> address of ``device``'s anchor of that dtype."""
    found = _anchor_addr.get(device)
    if found is None:
        found = _anchor_addr.setdefault(device, {kind: t.data_ptr() for kind, t in zip(
            KIND_OF_DTYPE.values(), anchors_on(device))})
    return found


def source_entry(t: torch.Tensor, hidden: int, anchor_addr: dict[int, int]) -> tuple[int, ...]:
    """The source entry (``SOURCE_*`` fields) of a 2-D source ``t`` (unit column stride)
    addressed from ``anchor_addr`` (``anchor_addresses`` of its device)."""
    kind = KIND_OF_DTYPE[t.dtype]
    esize = t.element_size()
    delta = t.data_ptr() - anchor_addr[kind]
    if delta % esize:
        raise ValueError("Invalid source: its address is not aligned to its element size")
    stride = t.stride(0)
    aligned = int(L.loads_aligned(delta, stride * esize, hidden * esize))
    return (delta // esize, stride, kind, t.shape[1], aligned)


STAGING_RING = 8  # step tables in flight: a buffer is rewritten only once its copy has left
RUN_STAGE_ROWS = 4096  # run rows a step stages in its persistent buffer (more: a buffer of their own)
_HALF = STAGING_RING // 2  # one event per half ring: a record and a wait every 4 steps
_RUN_BYTES = L.RUN_FIELDS * 8


class ResidentTables:
    """The run and step tables of one step engine, on ``device``, with the staging ring
    the step tables and changed run rows go up from, and what the queued steps still read.

    A step: ``staging_table()`` (the host rows to fill; starts the step's staging),
    ``stage_runs`` for run rows that changed (packed into the slot's persistent pinned
    buffer), then ``send_runs`` and ``upload_step`` (a driver copy each), the launch,
    ``end_step(retired)``. Objects a step retires (sources nothing else may hold) are kept
    until the event recorded after that step's launch has passed, so the allocator never
    hands their memory out under a queued kernel; on the CPU nothing is queued and nothing
    is kept. Every buffer is made here: a step allocates nothing.
    """

    def __init__(self, device: torch.device, *, max_requests: int, max_runs: int):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.max_requests, self.max_runs = max_requests, max_runs
        runs = np.zeros((max_runs, L.RUN_FIELDS), np.int64)
        runs[:, L.RUN_KIND] = L.KIND_NONE
        self.runs = torch.from_numpy(runs).to(self.device)
        rows = L.step_rows(max_requests)
        self.step = torch.zeros((rows, L.STEP_FIELDS), dtype=torch.int64, device=self.device)
        # Fixed anchors: a source's offset is counted from the anchor of its dtype.
        self.anchors = dict(zip(KIND_OF_DTYPE.values(), anchors_on(self.device)))
        self.anchor_addr = anchor_addresses(self.device)
        self.staging = [torch.zeros((rows, L.STEP_FIELDS), dtype=torch.int64, pin_memory=cuda)
                        for _ in range(STAGING_RING)]
        self._staging_np = [t.numpy() for t in self.staging]
        stage_rows = min(RUN_STAGE_ROWS, max_runs)
        self._run_stage = [torch.zeros((stage_rows, L.RUN_FIELDS), dtype=torch.int64, pin_memory=cuda)
                           for _ in range(STAGING_RING)]
        self._run_stage_mv = [memoryview(t.numpy()).cast("B") for t in self._run_stage]
        self._run_stage_ptrs = [t.data_ptr() for t in self._run_stage]
        self._stage_rows = stage_rows
        self._chunks: list = []  # this step's staged run rows: (first run, stage row or tensor, rows)
        self._stage_used = 0
        self._half_done = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._half_used = [False, False]
        self._retired: list[list] = [[], []]  # per half ring: what its queued steps read
        self.slot = 0  # the staging buffer the next step fills
        self._memcpy = _driver_memcpy() if cuda and torch.version.cuda else None
        self._step_ptr, self._row_bytes = self.step.data_ptr(), self.step.stride(0) * 8
        self._staging_ptrs = [t.data_ptr() for t in self.staging]
        self._device_index = (self.device.index or 0) if cuda else 0
        self._runs_ptr = self.runs.data_ptr()
        self._cuda = cuda
        self._last_stream: int | None = None  # the raw stream the last step ran on

    def staging_table(self) -> np.ndarray:
        """The host step table to fill for the next step (its last copy has left); the
        step's run staging starts empty.

        Starting a half of the ring waits for the event recorded after that half's last
        step: it blocks only if the GPU is ``_HALF`` steps behind; what those steps
        retired is let go.
        """
        s = self.slot
        if s % _HALF == 0:
            half = s // _HALF
            if self._half_used[half]:
                self._half_done[half].synchronize()
                self._retired[half] = []
        self._chunks = []
        self._stage_used = 0
        return self._staging_np[s]

    def staged_table(self) -> np.ndarray:
        """The host step table the current step filled (before ``end_step``)."""
        return self._staging_np[self.slot]

    def stage_runs(self, first: int, rows) -> None:
        """Stage run rows ``first ..`` for this step: ``rows`` is a flat list of ints
        (``RUN_FIELDS`` per row, packed into the slot's pinned buffer) or an int64 array
        ``[k, RUN_FIELDS]``. Sent by ``send_runs`` in the order staged."""
        k = len(rows) // L.RUN_FIELDS if type(rows) is list else len(rows)
        if not k:
            return
        at = self._stage_used
        if at + k <= self._stage_rows:
            if type(rows) is list:
                struct.pack_into(f"<{len(rows)}q", self._run_stage_mv[self.slot], at * _RUN_BYTES, *rows)
            else:
                self._run_stage[self.slot].numpy()[at:at + k] = rows
            self._stage_used = at + k
            self._chunks.append((first, at, k))
            return
        # more rows than the persistent buffer holds: a pinned buffer of their own, kept with
        # the step's retired objects until its copy has run
        spill = torch.tensor(np.asarray(rows, np.int64).reshape(k, L.RUN_FIELDS))
        if self._cuda:
            spill = spill.pin_memory()
        self._chunks.append((first, spill, k))

    def send_runs(self) -> None:
        """Copy this step's staged run rows to the run table, in stream order (one driver
        call a chunk on CUDA; a plain copy on the CPU). The step's first device work: on a
        stream other than the last step's, it first waits for the last step (the tables
        are shared, and a queued kernel may still read them)."""
        if self._cuda:
            stream = torch._C._cuda_getCurrentRawStream(self._device_index)
            if stream != self._last_stream:
                self._follow(stream)
        s = self.slot
        for first, at, k in self._chunks:
            src = at.data_ptr() if type(at) is torch.Tensor else self._run_stage_ptrs[s] + at * _RUN_BYTES
            dst = self._runs_ptr + first * _RUN_BYTES
            if not self._cuda:
                ctypes.memmove(dst, src, k * _RUN_BYTES)
            elif self._memcpy is None or self._memcpy(
                    dst, src, k * _RUN_BYTES, torch._C._cuda_getCurrentRawStream(self._device_index)) != 0:
                view = at if type(at) is torch.Tensor else self._run_stage[s][at:at + k]
                self.runs[first:first + k].copy_(view, non_blocking=True)
            if type(at) is torch.Tensor:
                self.retire_now([at])
        self._chunks = []

    def _follow(self, stream: int) -> None:
        """Order the current stream after everything queued on the last step's stream."""
        if self._last_stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.ExternalStream(self._last_stream, device=self.device))
            torch.cuda.current_stream(self.device).wait_event(event)
        self._last_stream = stream

    def upload_step(self, num_requests: int) -> None:
        """Copy the filled rows of the staging table up (header, ``num_requests`` request
        rows, end row).

        On CUDA the copy is one driver call on the current stream (``cuMemcpyHtoDAsync``:
        about a microsecond of host time, a few less than ``Tensor.copy_``'s dispatch);
        ``copy_`` where the driver call is unavailable or fails (it then enqueued nothing).
        """
        s = self.slot
        rows = num_requests + 2
        if not self._cuda:
            ctypes.memmove(self._step_ptr, self._staging_ptrs[s], rows * self._row_bytes)
        elif self._memcpy is None or self._memcpy(
                self._step_ptr, self._staging_ptrs[s], rows * self._row_bytes,
                torch._C._cuda_getCurrentRawStream(self._device_index)) != 0:
            if self._memcpy is not None:
                logger.info("cuMemcpyHtoDAsync failed; uploads use Tensor.copy_")
                self._memcpy = None
            self.step[:rows].copy_(self.staging[s][:rows], non_blocking=True)

    def enqueue_step_copy(self, slot: int) -> None:
        """Copy staging buffer ``slot`` whole to the device table (what a graph captures)."""
        self.step.copy_(self.staging[slot], non_blocking=True)

    def retire(self, objs: list) -> None:
        """Keep ``objs`` (sources let go of between steps) until the steps queued so far
        have run (CUDA); on the CPU nothing is queued and nothing is kept."""
        if objs and self._cuda:
            self._retired[(self.slot - 1) % STAGING_RING // _HALF].extend(objs)

    def retire_now(self, objs: list) -> None:
        """Keep ``objs`` until the step being staged now has run (CUDA)."""
        if objs and self._cuda:
            self._retired[self.slot // _HALF].extend(objs)

    def end_step(self, retired: list | None = None) -> None:
        """After the step's launch (or graph replay): keep ``retired`` until the step has
        run, record the half ring's event at its last step, and move the ring on."""
        s = self.slot
        if retired and self._cuda:
            self._retired[s // _HALF].extend(retired)
        if s % _HALF == _HALF - 1 and self._cuda:
            self._half_done[s // _HALF].record()
            self._half_used[s // _HALF] = True
        self.slot = (s + 1) % STAGING_RING


def write_step_table(table: np.ndarray, tokens: int, windows: list) -> None:
    """Write a step table with one packing call: the header (``tokens``, requests), a row
    per request from ``windows`` (flat ``base, prefix, first run, end run`` per request)
    and the end row. Every step of every path writes its table here or with the array
    fill that gathers the same columns."""
    r = len(windows) // 4
    vals = [tokens, r, 0, 0, 0, 0, 0, 0]
    for i in range(0, 4 * r, 4):
        vals += (windows[i], 0, windows[i + 1], 0, 0, 0, windows[i + 2], windows[i + 3])
    vals += (tokens, 0, 0, 0, 0, 0, 0, 0)
    struct.pack_into(f"<{len(vals)}q", table, 0, *vals)


def _driver_memcpy():
    """``cuMemcpyHtoDAsync`` from the CUDA driver through ctypes, or ``None``."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuMemcpyHtoDAsync_v2
    except (OSError, AttributeError) as exc:
        logger.info("step-table uploads use Tensor.copy_: %s", exc)
        return None
    fn.argtypes = (ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn
