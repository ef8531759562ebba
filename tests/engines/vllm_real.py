"""vLLM 0.33.0's own multimodal merge code, loaded from its published wheel.

Real: ``_merge_multimodal_embeddings`` (models/utils), ``SupportsMultiModal.embed_input_ids``
(models/interfaces), ``PlaceholderRange`` / ``MultiModalFeatureSpec`` (multimodal/inputs),
``get_mm_features_in_window``, ``CachedRequestState`` and the model runner's
``_gather_mm_embeddings`` (called on a stand-in runner holding just the state it reads).
"""

from __future__ import annotations

import functools
import types

import wheels

VLLM = "vllm==0.33.0"
REAL = {
    "vllm.model_executor.models.utils",
    "vllm.model_executor.models.interfaces",
    "vllm.multimodal.inputs",
    "vllm.multimodal.utils",
    "vllm.v1.worker.gpu_input_batch",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.utils",
    "vllm.utils.collection_utils",
    "vllm.utils.jsontree",
}
STUBBED = {"flashinfer", "xformers", "deep_gemm"}


@functools.cache
def load() -> types.SimpleNamespace:
    root = wheels.unpack(wheels.fetch(VLLM))
    importer = wheels.EngineImporter(root, "vllm", REAL, STUBBED)
    utils, interfaces, inputs, mm_utils, input_batch, runner = wheels.import_with_stubs(importer, [
        "vllm.model_executor.models.utils", "vllm.model_executor.models.interfaces",
        "vllm.multimodal.inputs", "vllm.multimodal.utils", "vllm.v1.worker.gpu_input_batch",
        "vllm.v1.worker.gpu_model_runner"])
    return types.SimpleNamespace(
        merge=utils._merge_multimodal_embeddings, SupportsMultiModal=interfaces.SupportsMultiModal,
        PlaceholderRange=inputs.PlaceholderRange, MultiModalFeatureSpec=inputs.MultiModalFeatureSpec,
        get_mm_features_in_window=mm_utils.get_mm_features_in_window,
        CachedRequestState=input_batch.CachedRequestState,
        gather_mm_embeddings=runner.GPUModelRunner._gather_mm_embeddings, runner=runner)
