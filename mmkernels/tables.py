"""Device-resident tables of the step kernel: runs (with their sources) and the step's windows.

Run rows are written when they change (a request registered, a source resolved or
released), in one upload per step that has changes; a step in steady state sends only
its step table: one non-blocking copy from a persistent pinned buffer. Sources are
addressed from fixed per-dtype anchors, so a run row stays valid across steps and a CUDA
graph captured once keeps reading the right rows. Layout: ``mmkernels/layout.py``.
"""

from __future__ import annotations

import ctypes
import logging
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
RUN_STAGE_ROWS = 4096  # run rows a step uploads from its persistent pinned buffer (more: pinned per call)
_HALF = STAGING_RING // 2  # one event per half ring: a record and a wait every 4 steps


class ResidentTables:
    """The run and step tables of one step engine, on ``device``, with the staging ring
    the step tables go up from and what the queued steps still read.

    A step: ``staging_table()`` (the host rows to fill), ``upload_step`` (one copy),
    the launch, ``end_step(retired)``. Objects a step retires (sources nothing else may
    hold) are kept until the event recorded after that step's launch has passed, so the
    allocator never hands their memory out under a queued kernel; on the CPU nothing is
    queued and nothing is kept.
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
        self._half_done = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._half_used = [False, False]
        self._retired: list[list] = [[], []]  # per half ring: what its queued steps read
        self.slot = 0  # the staging buffer the next step fills
        self._memcpy = _driver_memcpy() if cuda and torch.version.cuda else None
        self._step_ptr, self._row_bytes = self.step.data_ptr(), self.step.stride(0) * 8
        self._staging_ptrs = [t.data_ptr() for t in self.staging]
        self._device_index = (self.device.index or 0) if cuda else 0
        self._runs_ptr = self.runs.data_ptr()
        self._run_stage: list | None = None  # pinned run-row buffers, one per staging slot (lazily)

    def write_runs(self, run_idx: np.ndarray, run_rows: np.ndarray) -> None:
        """Overwrite run rows (distinct ascending indices): one upload, applied in stream
        order. Call after ``staging_table()`` of the step that needs them.

        Rows of one contiguous range (what registration writes) go up in one copy: on CUDA
        from the step's persistent pinned buffer with one driver call (no pinned
        allocation, no dispatch) when they fit it; others as ``(index, row)`` pairs,
        scattered on the device."""
        k = len(run_idx)
        if k == 0:
            return
        first = int(run_idx[0])
        if int(run_idx[-1]) - first == k - 1:
            if self._memcpy is not None and k <= RUN_STAGE_ROWS:
                if self._run_stage is None:
                    self._run_stage = [torch.empty((RUN_STAGE_ROWS, L.RUN_FIELDS), dtype=torch.int64,
                                                   pin_memory=True) for _ in range(STAGING_RING)]
                    self._run_stage_np = [t.numpy() for t in self._run_stage]
                    self._run_stage_ptrs = [t.data_ptr() for t in self._run_stage]
                s = self.slot
                self._run_stage_np[s][:k] = run_rows
                if self._memcpy(self._runs_ptr + first * L.RUN_FIELDS * 8, self._run_stage_ptrs[s],
                                k * L.RUN_FIELDS * 8,
                                torch._C._cuda_getCurrentRawStream(self._device_index)) == 0:
                    return
            upload = torch.from_numpy(np.ascontiguousarray(run_rows))
            if self.device.type == "cuda":  # pinned by torch's caching host allocator
                upload = upload.pin_memory()
            self.runs[first:first + k].copy_(upload, non_blocking=True)
            return
        packed = np.empty((k, 1 + L.RUN_FIELDS), dtype=np.int64)
        packed[:, 0], packed[:, 1:] = run_idx, run_rows
        upload = torch.from_numpy(packed)
        if self.device.type == "cuda":
            # pinned through torch's caching host allocator: not reused before the copy is done
            upload = upload.pin_memory().to(self.device, non_blocking=True)
        self.runs.index_copy_(0, upload[:, 0], upload[:, 1:])

    def staging_table(self) -> np.ndarray:
        """The host step table to fill for the next step (its last copy has left).

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
        return self._staging_np[s]

    def upload_step(self, num_requests: int) -> None:
        """Copy the filled rows of the staging table up (header, ``num_requests`` request
        rows, end row).

        On CUDA the copy is one driver call on the current stream (``cuMemcpyHtoDAsync``:
        about a microsecond of host time, a few less than ``Tensor.copy_``'s dispatch);
        ``copy_`` where the driver call is unavailable or fails (it then enqueued nothing).
        """
        s = self.slot
        rows = num_requests + 2
        if self._memcpy is None or self._memcpy(
                self._step_ptr, self._staging_ptrs[s], rows * self._row_bytes,
                torch._C._cuda_getCurrentRawStream(self._device_index)) != 0:
            if self._memcpy is not None:
                logger.info("cuMemcpyHtoDAsync failed; step-table uploads use Tensor.copy_")
                self._memcpy = None
            self.step[:rows].copy_(self.staging[s][:rows], non_blocking=True)

    def enqueue_step_copy(self, slot: int) -> None:
        """Copy staging buffer ``slot`` whole to the device table (what a graph captures)."""
        self.step.copy_(self.staging[slot], non_blocking=True)

    def retire(self, objs: list) -> None:
        """Keep ``objs`` (sources let go of between steps) until the steps queued so far
        have run (CUDA); on the CPU nothing is queued and nothing is kept."""
        if objs and self._half_done[0] is not None:
            self._retired[(self.slot - 1) % STAGING_RING // _HALF].extend(objs)

    def end_step(self, retired: list | None = None) -> None:
        """After the step's launch (or graph replay): keep ``retired`` until the step has
        run, record the half ring's event at its last step, and move the ring on."""
        s = self.slot
        cuda = self._half_done[0] is not None
        if retired and cuda:
            self._retired[s // _HALF].extend(retired)
        if s % _HALF == _HALF - 1 and cuda:
            self._half_done[s // _HALF].record()
            self._half_used[s // _HALF] = True
        self.slot = (s + 1) % STAGING_RING


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
