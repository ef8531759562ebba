"""mmkernels: the device layer of the multimodal embedding assembler.

Tensors and tables only: the step kernel (one fused Triton gather/scatter launch per
batch, from resident run tables), its launcher and CUDA-graph capture, its pure-torch
twins (the reference semantics), the tables' layout, and the backend choice. The host
layer (``mmassembler``) imports nothing but what ``__all__`` declares.
"""

from mmkernels import custom_ops  # noqa: F401  (registers torch.ops.mmkernels.*)
from mmkernels import layout
from mmkernels.backend import BackendUnavailableError, kernels_interpreted, resolve_backend
from mmkernels.ops import embed_and_gather, gather_rows
from mmkernels.reference import assemble_step_ref, embed_and_gather_ref, gather_rows_ref
from mmkernels.segments import check_segments
from mmkernels.step_op import StepGraph, StepOp, StepOps, check_block_rows
from mmkernels.pool import CapacityLimitError, TablePool, capacity_for, table_pool
from mmkernels.tables import (KIND_OF_DTYPE, SUPPORTED_DTYPES, ResidentTables, anchor_addresses,
                              source_entry, write_step_table)

__version__ = "0.2.0"

__all__ = [
    "BackendUnavailableError",
    "CapacityLimitError",
    "KIND_OF_DTYPE",
    "ResidentTables",
    "SUPPORTED_DTYPES",
    "StepGraph",
    "StepOp",
    "StepOps",
    "TablePool",
    "anchor_addresses",
    "assemble_step_ref",
    "capacity_for",
    "check_block_rows",
    "check_segments",
    "embed_and_gather",
    "embed_and_gather_ref",
    "gather_rows",
    "gather_rows_ref",
    "kernels_interpreted",
    "layout",
    "resolve_backend",
    "source_entry",
    "table_pool",
    "write_step_table",
    "__version__",
]
