"""A naive per-position oracle: the semantics of DESIGN §1, one position at a time.

Independent of the run builder and the device layer (no segments, no runs), so tests and the
demo can check both against it. O(tokens) Python: for checking only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mmassembler.items import Item, Request


def item_positions(item: Item) -> list[int]:
    """The positions that take an embedding row, in row order."""
    positions = [p for s, e in item.spans for p in range(int(s), int(e) + 1)]
    if item.embed_mask is None:
        return positions
    mask = [bool(m) for m in (item.embed_mask.tolist() if isinstance(item.embed_mask, torch.Tensor)
                              else item.embed_mask)]
    return [p for p, m in zip(positions, mask) if m]


def assemble_oracle(
    requests: Sequence[Request],
    input_ids: torch.Tensor,
    embedding_of: Callable[[Item], torch.Tensor],
    *,
    weight: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    deepstack_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expected (embeddings, deepstack) for a batch; ``embedding_of(item)`` gives its rows."""
    if weight is not None:
        vocab = weight.shape[0]
        result = torch.stack([weight[min(max(int(t), 0), vocab - 1)] for t in input_ids.tolist()]) \
            if input_ids.numel() else weight.new_empty((0, weight.shape[1]))
    else:
        result = out.clone()
    hidden = result.shape[1]
    ds = None
    if deepstack_out is not None:
        ds = torch.zeros_like(deepstack_out) if weight is not None else deepstack_out.clone()
    row0 = 0
    for req in requests:
        lo, hi = req.prefix_len, req.prefix_len + req.extend_len
        for item in req.items:
            positions = item_positions(item)
            if not any(lo <= p < hi for p in positions):
                continue
            emb = embedding_of(item)
            emb = emb.reshape(-1, emb.shape[-1])
            for k, p in enumerate(positions):
                if lo <= p < hi:
                    row = row0 + p - lo
                    result[row] = emb[k, :hidden].to(result.dtype)
                    if ds is not None:
                        extra = emb[k, hidden:]
                        ds[row] = extra.to(ds.dtype) if extra.numel() else 0
        row0 += hi - lo
    return result, ds
