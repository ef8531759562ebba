"""CUDA-graph mode: one launch over fixed buffers, captured once and replayed per batch.

A captured launch replays with the pointers and scalars it was captured with, so every
per-batch value lives in device buffers of fixed capacity: the metadata table
``[NUM_FIELDS, max_segments]`` and the counts ``[segments, tiles]`` that the kernel reads
on the device. Sources are addressed from fixed per-dtype anchors, and the grid covers
the largest batch (``max_tokens / BLOCK_R + max_segments`` tiles; programs past this
batch's tiles write nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mmkernels.backend import _kernel_module
from mmkernels.ops import build_plan, launch_config, search_steps
from mmkernels.segments import check_output

_ANCHOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # kind codes 0, 1, 2


class GraphLaunch:
    """A fixed-buffer launch of the assembly kernel, for ``torch.cuda.graph`` capture.

    ``update(sources, segments, num_rows)`` (host work plus one non-blocking copy) sets
    the next batch; ``launch()`` enqueues the kernel and is what gets captured. Fused mode
    when ``weight`` and ``input_ids`` (persistent, ``[max_tokens]``) are given.
    """

    def __init__(self, out: torch.Tensor, *, max_segments: int, weight: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None, deepstack_out: torch.Tensor | None = None,
                 interpreted: bool = False):
        check_output("out", out)
        if (weight is None) != (input_ids is None):
            raise ValueError("Invalid arguments: fused mode needs both weight and input_ids")
        if max_segments < 1:
            raise ValueError(f"Invalid max_segments: expected >= 1, got {max_segments}")
        import triton

        k = _kernel_module()
        dev = out.device
        self.out, self.weight, self.input_ids, self.deepstack_out = out, weight, input_ids, deepstack_out
        self.fused = weight is not None
        self.max_tokens, self.hidden = out.shape
        self.ds_cols = deepstack_out.shape[1] if deepstack_out is not None else 0
        self.max_segments = max_segments
        self.cfg = launch_config(self.hidden, self.ds_cols, interpreted)
        # one device buffer (table, then counts) filled by one copy from a pinned twin
        size = int(k.NUM_FIELDS) * max_segments + 2
        self._device_buf = torch.zeros(size, dtype=torch.int64, device=dev)
        self.meta = self._device_buf[:-2].view(int(k.NUM_FIELDS), max_segments)
        self.counts = self._device_buf[-2:]
        self._staging = torch.zeros(size, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self._copied = torch.cuda.Event() if dev.type == "cuda" else None
        self.anchors = [torch.empty(16, dtype=dt, device=dev) for dt in _ANCHOR_DTYPES]
        main_blocks = triton.cdiv(self.hidden, self.cfg.block_cols)
        self.grid = (triton.cdiv(self.max_tokens, self.cfg.block_rows) + max_segments,
                     main_blocks + triton.cdiv(self.ds_cols, self.cfg.block_cols))
        ds = deepstack_out if deepstack_out is not None else out
        self._args = (
            out, out.stride(0), ds, ds.stride(0),
            input_ids if self.fused else out, weight if self.fused else out,
            weight.stride(0) if self.fused else 0, weight.shape[0] if self.fused else 0,
            *self.anchors, self.meta, 0, max_segments, self.counts,
            self.hidden, self.ds_cols, main_blocks,
        )
        self._constexprs = dict(
            HAS_DS=self.ds_cols > 0, BLOCK_R=self.cfg.block_rows, BLOCK_H=self.cfg.block_cols,
            SEARCH_STEPS=search_steps(max_segments), HAS_TEXT=self.fused, HAS_F32=True,
            HAS_F16=True, HAS_BF16=True, ALIGNED=False, EMULATE_BF16_RNE=interpreted,
            COUNTS_ON_DEVICE=True, num_warps=self.cfg.num_warps,
        )
        self._sources: Sequence[torch.Tensor] = ()

    def update(self, sources: Sequence[torch.Tensor], segments: np.ndarray, num_rows: int,
               info: np.ndarray | None = None) -> None:
        """Set the next batch: checked segments sorted by output row, ``num_rows`` tokens.

        Raises ``ValueError`` when the batch exceeds the capacity the launch was made for.
        """
        k = _kernel_module()
        if num_rows > self.max_tokens:
            raise ValueError(f"Invalid batch: {num_rows} tokens exceed max_tokens {self.max_tokens}")
        plan = build_plan(segments, sources, self.cfg.block_rows, self.hidden,
                          num_rows if self.fused else None, info=info)
        n = plan.num_segments
        if n > self.max_segments:
            raise ValueError(f"Invalid batch: {n} segments (text runs included) exceed "
                             f"max_segments {self.max_segments}")
        meta = plan.meta[:, :n]
        kind, off, stride = meta[k.SRC_KIND], meta[k.SRC_OFF], meta[k.SRC_STRIDE]
        vec = np.where(kind == int(k.KIND_F32), 4, 8)
        if plan.aligned:  # back to element units: the captured kernel is the unaligned variant
            off *= vec
            stride *= vec
        for code, t in plan.anchors.items():  # rebase offsets on the fixed anchors
            shift = t.data_ptr() - self.anchors[code].data_ptr()
            esize = self.anchors[code].element_size()
            if shift % esize:
                raise ValueError("Invalid sources: a source address is not aligned to its element size")
            off[kind == code] += shift // esize
        if self._copied is not None:
            self._copied.synchronize()  # the previous batch's copy has left the staging buffer
        staging = self._staging.numpy()
        table = staging[:-2].reshape(int(k.NUM_FIELDS), self.max_segments)
        table[:, :n] = meta
        staging[-2:] = (n, plan.num_tiles)
        self._device_buf.copy_(self._staging, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self._sources = sources  # alive at least until the next batch is set

    def launch(self) -> None:
        """Enqueue the kernel (capturable: every argument is fixed)."""
        _kernel_module()._assemble_kernel[self.grid](*self._args, **self._constexprs)
