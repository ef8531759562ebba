"""Drop-ins for the engines' embedding assembly: SGLang's ``general_mm_embed_routine`` /
``prepare_mm_inputs`` / ``embed_mm_inputs`` and vLLM's runner gather and merge.

Duck-typed: no engine is imported. The adapters keep a resident ``Assembler`` per text
embedding; each engine request registers the first step it appears and goes when the
engine drops it, so a steady step costs the Assembler's step plus a snapshot per request.
"""

from mmassembler.engines.sglang import embed_mm_inputs, general_mm_embed_routine, prepare_mm_inputs
from mmassembler.engines.vllm import embed_input_ids, gather_mm_embeddings, merge_multimodal_embeddings

__all__ = ["embed_input_ids", "embed_mm_inputs", "gather_mm_embeddings", "general_mm_embed_routine",
           "merge_multimodal_embeddings", "prepare_mm_inputs"]
