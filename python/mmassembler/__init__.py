"""mmassembler: the host layer of the multimodal embedding assembler.

Requests and items in, the batch's input embeddings out: runs checked once per request,
sources resolved (encoded once per modality, split by what the encoder returned), every
count checked, one kernel launch. ``Assembler`` keeps requests resident across steps.
"""

from mmkernels import BackendUnavailableError, resolve_backend
from mmassembler.api import assemble
from mmassembler.assembler import Assembler
from mmassembler.cache import CacheStats, EmbeddingCache, cache_key
from mmassembler.encode import Encoder
from mmassembler.items import Item, ItemLayout, Request
from mmassembler.errors import (AssemblyError, BatchShapeError, CapacityError, ChunkWindowError,
                                EmbedMaskError, EmbeddingFormatError, EncoderOutputError,
                                MissingEncoderError, ReentrantCallError, RowCountError, SourceChangedError,
                                SpanError, UnknownHandleError)
from mmassembler.oracle import assemble_oracle

__version__ = "0.2.0"

__all__ = [
    "Assembler", "AssemblyError", "BackendUnavailableError", "BatchShapeError", "CacheStats",
    "CapacityError", "ChunkWindowError", "UnknownHandleError",
    "EmbedMaskError", "EmbeddingCache", "EmbeddingFormatError", "Encoder", "EncoderOutputError",
    "Item", "ItemLayout", "MissingEncoderError", "ReentrantCallError", "Request", "RowCountError",
    "SourceChangedError", "SpanError",
    "assemble", "assemble_oracle", "cache_key", "resolve_backend", "__version__",
]
