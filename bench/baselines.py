"""The engines' usual paths, written the way they write them, as benchmark baselines.

``masked_scatter``: per-item slicing in a host loop, ``torch.cat`` of the slices, a
placeholder mask from the ids on the device, ``masked_scatter_`` (SGLang/vLLM style).
``index_copy``: the same slices and ``torch.cat``, destination rows built on the host,
one ``index_copy_`` (vLLM's CPU-mask / cumsum style). Both do a full token lookup first.
"""

from __future__ import annotations

import torch


def _slices(requests):
    """Per item ∩ chunk: the embedding slice and its first output row (host loop)."""
    out, base = [], 0
    for req in requests:
        lo, hi = req.prefix_len, req.prefix_len + req.extend_len
        for item in req.items:
            (s, e), = item.spans
            a, b = max(s, lo), min(e + 1, hi)
            if a < b:
                out.append((item.embedding[a - s:b - s], base + a - lo))
        base += hi - lo
    return out


def masked_scatter(requests, input_ids, weight, vocab_size: int | None = None) -> torch.Tensor:
    """Lookup, then ``masked_scatter_`` of the concatenated slices over placeholder rows."""
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    embeds = weight[input_ids.clamp(0, vocab - 1)]
    parts = [t for t, _ in _slices(requests)]
    if parts:
        mm = torch.cat(parts).to(embeds.dtype)
        mask = (input_ids >= vocab).unsqueeze(-1)
        embeds.masked_scatter_(mask, mm)
    return embeds


def index_copy(requests, input_ids, weight) -> torch.Tensor:
    """Lookup, then one ``index_copy_`` with destination rows built on the host."""
    vocab = weight.shape[0]
    embeds = weight[input_ids.clamp(0, vocab - 1)]
    sl = _slices(requests)
    if sl:
        mm = torch.cat([t for t, _ in sl]).to(embeds.dtype)
        rows = torch.cat([torch.arange(r, r + t.shape[0]) for t, r in sl])
        if embeds.is_cuda:
            rows = rows.pin_memory().to(embeds.device, non_blocking=True)
        embeds.index_copy_(0, rows, mm)
    return embeds


BASELINES = {"masked_scatter": masked_scatter, "index_copy": index_copy}
