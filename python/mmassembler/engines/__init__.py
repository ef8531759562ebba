"""Engine-shaped entry points: SGLang's ``embed_mm_inputs`` and vLLM's merge/gather calls.

Duck-typed: no engine is imported. Each adapter turns the engine's objects into
``Request``/``Item`` (kept on the engine's objects between chunks, so per-request work
is done once) and makes one ``assemble`` call.
"""

from mmassembler.engines.sglang import embed_mm_inputs, general_mm_embed_routine, prepare_mm_inputs
from mmassembler.engines.vllm import embed_input_ids, gather_mm_embeddings, merge_multimodal_embeddings

__all__ = ["embed_input_ids", "embed_mm_inputs", "general_mm_embed_routine", "prepare_mm_inputs", "gather_mm_embeddings",
           "merge_multimodal_embeddings"]
