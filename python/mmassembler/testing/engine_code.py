"""The engines' own multimodal embedding code, loaded from their published wheels.

``load_sglang()``: SGLang 0.5.23's ``mm_utils`` (``embed_mm_inputs``, ``prepare_mm_inputs``),
``mm_schedule`` (chunking, cache, encoder batching), ``schedule_batch``
(``MultimodalDataItem``, ``MultimodalInputs``), ``Modality`` and its multimodal embedding
cache. ``load_vllm()``: vLLM 0.33.0's ``_merge_multimodal_embeddings``,
``SupportsMultiModal.embed_input_ids``, ``PlaceholderRange`` / ``MultiModalFeatureSpec``,
``get_mm_features_in_window``, ``CachedRequestState`` and the model runner's
``_gather_mm_embeddings`` (called on a stand-in runner holding the state it reads).
Everything else the engines import is a stub (see ``engine_wheels``). Used by the
conformance tests (``tests/engines``) and ``python -m bench --peers``.
"""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path

import torch

from mmassembler.testing import engine_wheels as wheels

SGLANG = "sglang==0.5.23"
MSGSPEC = "msgspec==0.19.0"  # SGLang's dependency for MultimodalDataItem (a msgspec.Struct)
SGLANG_REAL = {
    "sglang.srt.managers.mm_utils",
    "sglang.srt.managers.mm_schedule",
    "sglang.srt.managers.schedule_batch",
    "sglang.srt.multimodal.modality",
    "sglang.srt.mem_cache.multimodal_cache",
    "sglang.srt.utils",  # flatten_nested_list, is_hip & co.: their real answers
    "sglang.srt.utils.common",
    "sglang.srt.plugins",  # the plugin loader and its hook registry (our entry point is tested there)
    "sglang.srt.plugins.hook_registry",
    "sglang.srt.environ",
}
SGLANG_STUBBED = {"sgl_kernel", "flashinfer", "triton_kernels", "deep_gemm"}  # more are added when missing


@functools.cache
def load_sglang() -> types.SimpleNamespace:
    """The real modules and classes; raises ``wheels.WheelUnavailable`` without the wheels."""
    msgspec_root = wheels.source(MSGSPEC, (".py", ".so", ".pyi"))
    if str(msgspec_root) not in sys.path:
        sys.path.append(str(msgspec_root))
    root = wheels.source(SGLANG)
    importer = wheels.EngineImporter(root, "sglang", SGLANG_REAL, SGLANG_STUBBED)
    mm_schedule, mm_utils, schedule_batch, modality, plugins = wheels.import_with_stubs(importer, [
        "sglang.srt.managers.mm_schedule", "sglang.srt.managers.mm_utils",
        "sglang.srt.managers.schedule_batch", "sglang.srt.multimodal.modality", "sglang.srt.plugins"])
    Modality = modality.Modality

    return types.SimpleNamespace(mm_utils=mm_utils, mm_schedule=mm_schedule, Modality=Modality,
                                 MultimodalDataItem=schedule_batch.MultimodalDataItem,
                                 MultimodalInputs=schedule_batch.MultimodalInputs, plugins=plugins)


VLLM = "vllm==0.33.0"
VLLM_REAL = {
    "vllm.model_executor.models.utils",
    "vllm.model_executor.models.interfaces",
    "vllm.multimodal.inputs",
    "vllm.multimodal.utils",
    "vllm.v1.worker.gpu_input_batch",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.utils",
    "vllm.utils.collection_utils",
    "vllm.utils.jsontree",
    "vllm.plugins",  # the general plugin loader (our entry point is tested there)
    "vllm.envs",
}
VLLM_STUBBED = {"flashinfer", "xformers", "deep_gemm"}


@functools.cache
def load_vllm() -> types.SimpleNamespace:
    root = wheels.source(VLLM)
    importer = wheels.EngineImporter(root, "vllm", VLLM_REAL, VLLM_STUBBED)
    utils, interfaces, inputs, mm_utils, input_batch, runner, plugins = wheels.import_with_stubs(importer, [
        "vllm.model_executor.models.utils", "vllm.model_executor.models.interfaces",
        "vllm.multimodal.inputs", "vllm.multimodal.utils", "vllm.v1.worker.gpu_input_batch",
        "vllm.v1.worker.gpu_model_runner", "vllm.plugins"])
    runner.PIN_MEMORY = torch.cuda.is_available()  # what vLLM has: pinned staging only with CUDA
    return types.SimpleNamespace(
        merge=utils._merge_multimodal_embeddings, SupportsMultiModal=interfaces.SupportsMultiModal,
        PlaceholderRange=inputs.PlaceholderRange, MultiModalFeatureSpec=inputs.MultiModalFeatureSpec,
        get_mm_features_in_window=mm_utils.get_mm_features_in_window,
        CachedRequestState=input_batch.CachedRequestState,
        gather_mm_embeddings=runner.GPUModelRunner._gather_mm_embeddings, runner=runner, plugins=plugins,
        utils=utils, interfaces=interfaces)


def export(dest: Path) -> None:
    """Copy the engines' modules these loaders run into ``dest``, with msgspec for every
    interpreter whose wheel is in the cache, so a machine without a registry (the GPU
    machine) loads them with ``MMASSEMBLER_WHEEL_CACHE=dest``."""
    native = (".py", ".so", ".pyi")
    msgspec = {wheels.unpack(w, native): set() for w in wheels.CACHE.glob("msgspec-*.whl")}
    wheels.export({wheels.source(SGLANG): SGLANG_REAL, wheels.source(VLLM): VLLM_REAL,
                   wheels.source(MSGSPEC, native): set(), **msgspec}, dest)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmassembler.testing.engine_code",
                                 description="Export the engines' modules (and msgspec for every "
                                 "interpreter given) for a machine without a registry; point "
                                 "MMASSEMBLER_WHEEL_CACHE there.")
    ap.add_argument("dest", type=Path, help="folder to export into")
    ap.add_argument("--python", nargs="*", default=[],
                    help="target interpreters, e.g. 3.12: their compiled msgspec is fetched too")
    args = ap.parse_args(argv)
    for version in args.python:
        wheels.fetch_for_python(MSGSPEC, version)
    export(args.dest)
    print(f"exported to {args.dest}: set MMASSEMBLER_WHEEL_CACHE={args.dest} there")
    return 0


if __name__ == "__main__":  # python -m mmassembler.testing.engine_code DEST [--python 3.12]
    raise SystemExit(main())


class VllmModel:
    """What vLLM's ``SupportsMultiModal.embed_input_ids`` reads off a model: the language
    model's ``embed_input_ids`` and whether placeholder ids lie past the vocabulary. Its
    ``embed_input_ids`` is the engine's real one."""

    def __init__(self, vl: types.SimpleNamespace, embed_input_ids, oov_mm_tokens: bool = False):
        self._vl, self._lm = vl, types.SimpleNamespace(embed_input_ids=embed_input_ids)
        self._has_oov_mm_tokens = oov_mm_tokens

    def get_language_model(self):
        return self._lm

    def embed_input_ids(self, *args, **kwargs):
        return self._vl.SupportsMultiModal.embed_input_ids(self, *args, **kwargs)

    def _embed_text_input_ids(self, *args, **kwargs):
        return self._vl.SupportsMultiModal._embed_text_input_ids(self, *args, **kwargs)


def vllm_runner(states: list, encoder_cache: dict, **attrs) -> types.SimpleNamespace:
    """A stand-in ``GPUModelRunner`` with the state its ``_gather_mm_embeddings`` reads."""
    return types.SimpleNamespace(
        input_batch=types.SimpleNamespace(req_ids=[s.req_id for s in states]),
        requests={s.req_id: s for s in states}, encoder_cache=encoder_cache,
        is_multimodal_pruning_enabled=False, uses_mrope=False,
        _get_encoder_output_from_cache=encoder_cache.get, **attrs)
