"""CUDA-graph mode for the host layer: assemble into persistent buffers with a launch
that is captured once and replayed for every batch that fits the capacity.

    ga = GraphAssembler(max_tokens=8192, max_segments=1024, weight=embed.weight)
    ga.prepare(requests, input_ids)        # host work + one copy; nothing captured
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ga.launch()                        # the only device work of the step
    ...
    n = ga.prepare(next_requests, next_ids)
    graph.replay()                         # ga.out[:n] holds the batch's embeddings
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

import mmkernels
from mmassembler.api import prepare_batch
from mmassembler.batch import Request
from mmassembler.cache import EmbeddingCache
from mmassembler.encode import Encoder, EncoderFn
from mmassembler.errors import BatchShapeError
from mmkernels.graphs import GraphLaunch


class GraphAssembler:
    """Fixed-capacity assembly whose ``launch()`` can be captured in a CUDA graph.

    Fused mode with ``weight`` (``out`` and ``input_ids`` are allocated here, ``max_tokens``
    rows), scatter mode with ``out`` (the engine's persistent ``inputs_embeds``).
    ``max_segments`` bounds the segments of one batch, text runs between items included
    in fused mode (at most twice the items' runs plus one).
    """

    def __init__(self, *, max_tokens: int, max_segments: int, weight: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, deepstack_out: torch.Tensor | None = None,
                 encoders: Mapping[str, EncoderFn | Encoder] | None = None,
                 cache: EmbeddingCache | None = None):
        if (weight is None) == (out is None):
            raise BatchShapeError("pass exactly one of weight (fused mode) and out (scatter mode)")
        ref = weight if weight is not None else out
        self.weight, self.encoders, self.cache = weight, encoders, cache
        self.max_tokens = max_tokens
        if weight is not None:
            self.out = torch.empty((max_tokens, weight.shape[1]), dtype=weight.dtype, device=ref.device)
            self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=ref.device)
        else:
            if out.shape[0] < max_tokens:
                raise BatchShapeError(f"out has {out.shape[0]} rows, fewer than max_tokens {max_tokens}")
            self.out, self.input_ids = out, None
        self.deepstack_out = deepstack_out
        which = mmkernels.resolve_backend("triton", ref.device)
        self.launcher = GraphLaunch(self.out, max_segments=max_segments, weight=weight,
                                    input_ids=self.input_ids, deepstack_out=deepstack_out,
                                    interpreted=which == "interpreter")
        self.num_tokens = 0

    def prepare(self, requests: Sequence[Request], input_ids: torch.Tensor | None = None) -> int:
        """Check and plan the next batch and stage it for ``launch()``; returns its tokens.

        Raises an ``AssemblyError`` (capacity: ``BatchShapeError``) before any write.
        """
        plan, sources, info = prepare_batch(
            requests, input_ids, weight=self.weight, out=None if self.weight is not None else self.out,
            deepstack_out=self.deepstack_out, encoders=self.encoders, cache=self.cache,
            buffers_hold_more=True, check_plan=self._check_capacity)
        n = plan.num_tokens
        try:
            self.launcher.update(sources, plan.segments, n, info)
        except ValueError as exc:  # capacity: raised before the buffers are touched
            raise BatchShapeError(str(exc)) from None
        if self.input_ids is not None:
            self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.num_tokens = n
        return n

    def _check_capacity(self, plan) -> None:
        """Tokens and table columns (segments, plus the text runs between them in fused
        mode) within capacity; called before sources are resolved."""
        n, segs = plan.num_tokens, plan.segments
        if n > self.max_tokens:
            raise BatchShapeError(f"the batch has {n} tokens, more than max_tokens {self.max_tokens}")
        columns = len(segs)
        if self.weight is not None:
            if columns:
                starts, ends = segs[:, 2], segs[:, 2] + segs[:, 3]
                columns += int((starts[1:] > ends[:-1]).sum()) + int(starts[0] > 0) + int(ends[-1] < n)
            else:
                columns = int(n > 0)
        if columns > self.launcher.max_segments:
            raise BatchShapeError(f"Invalid batch: {columns} segments (text runs included) exceed "
                                  f"max_segments {self.launcher.max_segments}")

    def launch(self) -> None:
        """The step's device work: capture it once, replay it after each ``prepare``."""
        self.launcher.launch()
