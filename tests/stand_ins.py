"""The engine stand-ins every test uses: duck-typed SGLang and vLLM objects (what our
adapters read off the engines' own), and text embeddings that are not a plain table.

The conformance tests use the engines' real classes from their wheels
(``mmassembler.testing.engine_code``); these stand-ins drive the adapters where the
engines' code is not what is tested.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import nn


# -- SGLang: MultimodalInputs with mm_items of MultimodalDataItem ------------------------------
class Modality(enum.Enum):
    IMAGE = 1
    AUDIO = 2


@dataclass(eq=False)
class SgItem:
    modality: Modality
    hash: int
    offsets: list
    precomputed_embeddings: torch.Tensor | None = None
    feature: torch.Tensor | None = None  # what the encoder reads: here, the true embedding


@dataclass(eq=False)
class SgInputs:
    mm_items: list


def sg_item(hash_: int, offsets: list, **kw) -> SgItem:
    """An image item."""
    return SgItem(Modality.IMAGE, hash_, offsets, **kw)


# -- vLLM: CachedRequestState with mm_features of MultiModalFeatureSpec -------------------------
@dataclass
class PlaceholderRange:
    offset: int
    length: int
    is_embed: torch.Tensor | None = None


@dataclass(eq=False)
class Feature:
    identifier: str
    mm_position: PlaceholderRange
    modality: str = "image"


@dataclass(eq=False)
class RunnerRequest:
    num_computed_tokens: int
    num_scheduled_tokens: int
    mm_features: list = field(default_factory=list)


# -- text embeddings that are not a plain table ---------------------------------------------------
class ScaledEmbedding(nn.Embedding):
    """Gemma3's text embedding: the looked-up rows times a scale (not the bare weight)."""

    def forward(self, ids):
        return super().forward(ids) * torch.tensor(self.embedding_dim ** 0.5, dtype=self.weight.dtype)


class TensorParallelEmbedding(nn.Module):
    """A vocabulary split over two ranks (this rank holds a shard; the module returns full
    rows after its all-reduce): its ``weight`` is not the vocabulary."""

    def __init__(self, vocab, hidden, dtype=torch.float32):
        super().__init__()
        self.full = nn.Embedding(vocab, hidden).to(dtype)
        self.weight = nn.Parameter(self.full.weight[: (vocab + 1) // 2].clone())
        self.num_embeddings = vocab

    def forward(self, ids):
        return self.full(ids)


class VocabParallelEmbedding(nn.Embedding):
    """Stands for SGLang's VocabParallelEmbedding: a subclass of ``nn.Embedding`` (so not
    exactly one) whose weight the adapter must not read as the table."""

    tp_size = 2


class ShardEmbedding(nn.Module):
    """One tensor-parallel rank's shard before the all-reduce: rows ``[0, vocab / 2)`` of
    ``full``; ids outside it give zeros (the other rank's share)."""

    def __init__(self, full: torch.Tensor):
        super().__init__()
        self.half = full.shape[0] // 2
        self.weight = nn.Parameter(full[: self.half].clone())
        self.num_embeddings, self.tp_size = full.shape[0], 2

    def forward(self, ids):
        inside = ids < self.half
        return torch.where(inside[:, None], self.weight[ids.clamp(0, self.half - 1)], 0.0)
