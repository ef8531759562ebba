"""mmkernels: the device layer of the multimodal embedding assembler.

Tensors and tables only: the step kernel (one fused Triton gather/scatter launch per
batch, from resident run tables or from a batch's segments), its pure-torch twins (the
reference semantics), and the backend choice.
"""

from mmkernels import custom_ops  # noqa: F401  (registers torch.ops.mmkernels.*)
from mmkernels.backend import BackendUnavailableError, kernels_interpreted, resolve_backend
from mmkernels.ops import embed_and_gather, gather_rows
from mmkernels.reference import embed_and_gather_ref, gather_rows_ref
from mmkernels.segments import check_segments

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "embed_and_gather",
    "embed_and_gather_ref",
    "gather_rows",
    "gather_rows_ref",
    "kernels_interpreted",
    "check_segments",
    "resolve_backend",
    "__version__",
]
