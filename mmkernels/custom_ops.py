"""The device ops as ``torch.library`` custom ops, so ``torch.compile`` can call them.

``torch.ops.mmkernels.gather_rows`` mutates ``out`` (and ``deepstack_out``);
``torch.ops.mmkernels.embed_and_gather`` returns a new tensor and
``torch.ops.mmkernels.embed_and_gather_out`` writes a given ``out`` (an op's result may not
alias its inputs, hence two ops); both mutate ``deepstack_out``. Every argument of the
public functions that changes the result travels (``backend``, ``block_rows``), so a
compiled call does what an eager one does. Fake implementations give compile the output
shapes. Eager calls of ``mmkernels.gather_rows`` / ``embed_and_gather`` do not go through
the dispatcher (it costs more than a small launch); only calls made while compiling are
routed here. Inside a compiled region, ``segments`` must be an int64 CPU tensor ``[S, 4]``.
The ops are for inference (no autograd formula): call them under ``torch.no_grad`` or
``inference_mode``. Optional mutated arguments have no default: some torch releases drop a
defaulted optional mutated argument before bumping its version counter, which then fails.
"""

from __future__ import annotations

import torch
from torch.library import custom_op


@custom_op("mmkernels::gather_rows", mutates_args=("out", "deepstack_out"))
def gather_rows_op(out: torch.Tensor, sources: list[torch.Tensor], segments: torch.Tensor,
                   deepstack_out: torch.Tensor | None, backend: str = "auto",
                   block_rows: int | None = None) -> None:
    """Scatter mode as a custom op (see ``mmkernels.gather_rows``)."""
    from mmkernels.ops import gather_rows

    gather_rows(out, sources, segments, deepstack_out=deepstack_out, backend=backend,
                       block_rows=block_rows)


@gather_rows_op.register_fake
def _(out, sources, segments, deepstack_out, backend="auto", block_rows=None) -> None:
    return None


@custom_op("mmkernels::embed_and_gather", mutates_args=("deepstack_out",))
def embed_and_gather_op(input_ids: torch.Tensor, weight: torch.Tensor, sources: list[torch.Tensor],
                        segments: torch.Tensor, deepstack_out: torch.Tensor | None,
                        backend: str = "auto", block_rows: int | None = None) -> torch.Tensor:
    """Fused mode into a new tensor, as a custom op (see ``mmkernels.embed_and_gather``)."""
    from mmkernels.ops import embed_and_gather

    return embed_and_gather(input_ids, weight, sources, segments, deepstack_out=deepstack_out,
                                   backend=backend, block_rows=block_rows)


@embed_and_gather_op.register_fake
def _(input_ids, weight, sources, segments, deepstack_out, backend="auto", block_rows=None):
    return weight.new_empty((input_ids.shape[0], weight.shape[1]))


@custom_op("mmkernels::embed_and_gather_out", mutates_args=("out", "deepstack_out"))
def embed_and_gather_out_op(input_ids: torch.Tensor, weight: torch.Tensor, sources: list[torch.Tensor],
                            segments: torch.Tensor, out: torch.Tensor, deepstack_out: torch.Tensor | None,
                            backend: str = "auto", block_rows: int | None = None) -> None:
    """Fused mode into a given ``out``, as a custom op (see ``mmkernels.embed_and_gather``)."""
    from mmkernels.ops import embed_and_gather

    embed_and_gather(input_ids, weight, sources, segments, out=out, deepstack_out=deepstack_out,
                            backend=backend, block_rows=block_rows)


@embed_and_gather_out_op.register_fake
def _(input_ids, weight, sources, segments, out, deepstack_out, backend="auto", block_rows=None) -> None:
    return None
