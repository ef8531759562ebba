"""The device ops as ``torch.library`` custom ops, so ``torch.compile`` can call them.

``torch.ops.mmkernels.gather_rows`` mutates ``out`` (and ``deepstack_out``);
``torch.ops.mmkernels.embed_and_gather`` returns a new tensor (and mutates
``deepstack_out``). Fake implementations give compile the output shapes. Eager calls of
``mmkernels.gather_rows`` / ``embed_and_gather`` do not go through the dispatcher (it costs
more than a small launch); only calls made while compiling are routed here. Inside a
compiled region, ``segments`` must be an int64 CPU tensor ``[S, 4]``. The ops are for
inference (no autograd formula): call them under ``torch.no_grad``/``inference_mode``.
``deepstack_out`` has no default: some torch releases drop a defaulted optional mutated
argument before bumping its version counter, which then fails.
"""

from __future__ import annotations

import torch
from torch.library import custom_op


@custom_op("mmkernels::gather_rows", mutates_args=("out", "deepstack_out"))
def gather_rows_op(out: torch.Tensor, sources: list[torch.Tensor], segments: torch.Tensor,
                   deepstack_out: torch.Tensor | None) -> None:
    """Scatter mode as a custom op (see ``mmkernels.gather_rows``)."""
    from mmkernels.ops import _gather_rows_eager

    _gather_rows_eager(out, sources, segments, deepstack_out=deepstack_out)


@gather_rows_op.register_fake
def _(out, sources, segments, deepstack_out) -> None:
    return None


@custom_op("mmkernels::embed_and_gather", mutates_args=("deepstack_out",))
def embed_and_gather_op(input_ids: torch.Tensor, weight: torch.Tensor, sources: list[torch.Tensor],
                        segments: torch.Tensor, deepstack_out: torch.Tensor | None
                        ) -> torch.Tensor:
    """Fused mode as a custom op (see ``mmkernels.embed_and_gather``)."""
    from mmkernels.ops import _embed_and_gather_eager

    return _embed_and_gather_eager(input_ids, weight, sources, segments, deepstack_out=deepstack_out)


@embed_and_gather_op.register_fake
def _(input_ids, weight, sources, segments, deepstack_out) -> torch.Tensor:
    return weight.new_empty((input_ids.shape[0], weight.shape[1]))
