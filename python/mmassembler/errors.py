"""Typed errors for bad input: each names the request and item it concerns.

Every error is raised before anything is written: the output buffer and the cache stay
as they were. ``AssemblyError`` subclasses ``ValueError`` so generic handlers still work.
"""

from __future__ import annotations

import copy


class AssemblyError(ValueError):
    """Base of every error the library raises on bad input.

    Attributes ``request`` (index in the batch) and ``item_key`` are ``None`` where the
    error concerns the whole batch.
    """

    def __init__(self, message: str, *, request: int | None = None, item_key: int | None = None):
        self.message = message
        self.request = request
        self.item_key = item_key
        where = []
        if request is not None:
            where.append(f"request {request}")
        if item_key is not None:
            where.append(f"item {item_key}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def naming(self, request: int) -> "AssemblyError":
        """The same error naming ``request`` (raised where the request's index was unknown)."""
        named = copy.copy(self)
        AssemblyError.__init__(named, self.message, request=request, item_key=self.item_key)
        return named


class BatchShapeError(AssemblyError):
    """Arguments that disagree: input_ids length vs extend lengths, buffer shapes, modes."""


class ChunkWindowError(AssemblyError):
    """A request's chunk window is negative or runs past its prompt."""


class SpanError(AssemblyError):
    """An item's placeholder spans are out of order, overlapping, negative or past the prompt."""


class EmbedMaskError(SpanError):
    """An item's ``embed_mask`` does not have one entry per placeholder position."""


class RowCountError(AssemblyError):
    """An embedding (precomputed, cached or encoded) has a row count other than needed.

    ``expected`` and ``returned`` hold the two counts where they are known.
    """

    def __init__(self, message: str, *, request: int | None = None, item_key: int | None = None,
                 expected: int | None = None, returned: int | None = None):
        self.expected = expected
        self.returned = returned
        super().__init__(message, request=request, item_key=item_key)


class EmbeddingFormatError(AssemblyError):
    """An embedding whose hidden size, dtype kind or device does not fit the output."""


class MissingEncoderError(AssemblyError):
    """An item has no embedding, no cache entry and no encoder for its modality."""


class EncoderOutputError(RowCountError):
    """An encoder returned something other than a list of tensors or (tensor, rows_per_item)."""


class SourceChangedError(AssemblyError):
    """A source the assembler reads in place changed under it (a ``stable`` encoder's output
    written in place while held): found by the ``check_stable`` debug option."""


class CapacityError(BatchShapeError):
    """A request or step does not fit the capacity an ``Assembler`` was made with."""


class UnknownHandleError(AssemblyError):
    """A handle that no live request of this ``Assembler`` has (never added, or removed)."""


class ReentrantCallError(AssemblyError):
    """A call into an ``Assembler`` (or the stateless ``assemble``) from inside another on
    the same thread, e.g. an encoder that steps the assembler encoding for it: refused
    rather than deadlocking or interleaving two steps' tables."""
