"""A readable account of one step, for bug reports: what each request's window reads.

``describe_step(asm, handles, prefix_lens, extend_lens)`` reads the registry only (no
step is run, nothing changes) and writes, per request: its handle, window, output rows,
and each run of its items with the item's key, modality and source (held or not, dtype,
shape, where its rows start).
"""

from __future__ import annotations

import numpy as np

from mmkernels import layout as L


def describe_step(asm, handles, prefix_lens, extend_lens) -> str:
    """The step's table in readable form (see the module doc)."""
    reg = asm.registry
    h = np.asarray(handles, np.int64).reshape(-1).tolist()
    p = np.asarray(prefix_lens, np.int64).reshape(-1).tolist()
    e = np.asarray(extend_lens, np.int64).reshape(-1).tolist()
    lines = [f"{asm!r}", f"step: {len(h)} requests, {sum(e)} tokens"]
    base = 0
    for i, (hd, lo, n) in enumerate(zip(h, p, e)):
        rec = reg.recs[hd] if 0 < hd <= reg.max_requests else None
        if rec is None:
            lines.append(f"  request {i}: handle {hd} is not registered")
            base += n
            continue
        prompt = rec.prompt
        lines.append(f"  request {i}: handle {hd}, window [{lo}, {lo + n}) of a prompt of "
                     f"{'?' if prompt >= (1 << 40) else prompt}, output rows [{base}, {base + n})")
        b = rec.batch
        for k in range(rec.ra, rec.ra + rec.nruns):
            pos, end = b.rpos[k], b.rend[k]
            j = rec.item_of_run(k)
            row = 0 if rec.simple else b.rrow[k]
            reach = "reached" if pos < lo + n and end > lo else "outside"
            held = b.srcs[j]
            if held is None:
                desc = "no source held"
            else:
                src, ent = held[0], held[2]
                desc = (f"source {str(src.dtype).replace('torch.', '')} {list(src.shape)} "
                        f"(offset {ent[L.SOURCE_OFF]}, stride {ent[L.SOURCE_STRIDE]}, "
                        f"{'16-byte' if ent[L.SOURCE_ALIGNED] else 'element'} loads)")
            lines.append(f"    positions [{pos}, {end}) <- rows [{row}, {row + end - pos}) of item "
                         f"{b.keys[j]!r} ({b.mods[j]}): {desc}; {reach}")
        base += n
    return "\n".join(lines)
