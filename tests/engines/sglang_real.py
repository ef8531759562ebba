"""SGLang 0.5.23's own multimodal embedding code, loaded from its published wheel.

Real: ``mm_utils`` (``embed_mm_inputs``, ``prepare_mm_inputs``), ``mm_schedule`` (chunking,
cache, encoder batching), ``schedule_batch`` (``MultimodalDataItem``, ``MultimodalInputs``),
``Modality`` and the multimodal embedding cache. Everything else SGLang imports is a stub.
"""

from __future__ import annotations

import functools
import sys
import types

import wheels

SGLANG = "sglang==0.5.23"
MSGSPEC = "msgspec==0.19.0"  # SGLang's dependency for MultimodalDataItem (a msgspec.Struct)
REAL = {
    "sglang.srt.managers.mm_utils",
    "sglang.srt.managers.mm_schedule",
    "sglang.srt.managers.schedule_batch",
    "sglang.srt.multimodal.modality",
    "sglang.srt.mem_cache.multimodal_cache",
    "sglang.srt.utils",  # flatten_nested_list, is_hip & co.: their real answers
    "sglang.srt.utils.common",
}
STUBBED = {"sgl_kernel", "flashinfer", "triton_kernels", "deep_gemm"}  # more are added when missing


@functools.cache
def load() -> types.SimpleNamespace:
    """The real modules and classes; raises ``wheels.WheelUnavailable`` without the wheels."""
    msgspec_root = wheels.unpack(wheels.fetch(MSGSPEC), (".py", ".so", ".pyi"))
    if str(msgspec_root) not in sys.path:
        sys.path.append(str(msgspec_root))
    root = wheels.unpack(wheels.fetch(SGLANG))
    importer = wheels.EngineImporter(root, "sglang", REAL, STUBBED)
    mm_schedule, mm_utils, schedule_batch, modality = wheels.import_with_stubs(importer, [
        "sglang.srt.managers.mm_schedule", "sglang.srt.managers.mm_utils",
        "sglang.srt.managers.schedule_batch", "sglang.srt.multimodal.modality"])
    Modality = modality.Modality

    return types.SimpleNamespace(mm_utils=mm_utils, mm_schedule=mm_schedule, Modality=Modality,
                                 MultimodalDataItem=schedule_batch.MultimodalDataItem,
                                 MultimodalInputs=schedule_batch.MultimodalInputs)
