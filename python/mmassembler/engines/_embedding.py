"""How the adapters get text rows: fused lookup only for a table they can prove plain.

A token embedding is read as a weight table (fused mode, one pass) only when it is
exactly ``torch.nn.Embedding`` without ``max_norm`` (whose forward renormalises rows), or
a 2-D tensor given as the table itself. Anything else -- Gemma3's scaled embedding, a
tensor-parallel ``VocabParallelEmbedding`` holding one rank's shard, a model's own
``embed_input_ids`` -- is called on the ids and the multimodal rows are scattered over
its output, so text rows are always what the engine computes.
"""

from __future__ import annotations

import torch

from mmassembler.errors import BatchShapeError


def plain_table(embed) -> torch.Tensor | None:
    """The weight table when ``embed`` provably is one, else ``None``."""
    if isinstance(embed, torch.Tensor):
        return embed if embed.dim() == 2 else None
    if type(embed) is torch.nn.Embedding and embed.max_norm is None:
        return embed.weight
    return None


def vocab_size(embed) -> int | None:
    """The full vocabulary of an embedding module, when it says (``num_embeddings``, as
    ``nn.Embedding`` and the engines' vocabulary-parallel embeddings do, or ``vocab_size``)."""
    for name in ("num_embeddings", "vocab_size", "org_vocab_size"):
        n = getattr(embed, name, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def text_rows(embed, input_ids: torch.Tensor) -> torch.Tensor:
    """``embed(ids)``, checked. Ids are clamped into the vocabulary when the module gives
    its size: placeholder ids may lie outside it (SGLang's pad values, vLLM's out-of-vocabulary
    media tokens) and their rows are overwritten anyway."""
    if not callable(embed):
        raise BatchShapeError(f"embed_tokens must be an embedding module, a callable ids -> "
                              f"[n, hidden] or a 2-D weight, got {type(embed).__name__}")
    vocab = vocab_size(embed)
    ids = input_ids.clamp(0, vocab - 1) if vocab else input_ids
    rows = embed(ids)
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] != input_ids.shape[0]:
        raise BatchShapeError(f"embed_tokens(ids) must return [{input_ids.shape[0]}, hidden], got "
                              f"{getattr(rows, 'shape', type(rows).__name__)}")
    return rows.detach()  # assembly is inference: multimodal rows are written into it in place
