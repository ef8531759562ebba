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
    h = np.asarray(handles, np.int64).reshape(-1)
    p = np.asarray(prefix_lens, np.int64).reshape(-1)
    e = np.asarray(extend_lens, np.int64).reshape(-1)
    lines = [f"{asm!r}", f"step: {len(h)} requests, {int(e.sum()) if len(e) else 0} tokens"]
    base = 0
    for i, (hd, lo, n) in enumerate(zip(h.tolist(), p.tolist(), e.tolist())):
        if not (0 < hd <= reg.max_requests and reg.live[hd]):
            lines.append(f"  request {i}: handle {hd} is not registered")
            base += n
            continue
        prompt = int(reg.prompt_len[hd])
        lines.append(f"  request {i}: handle {hd}, window [{lo}, {lo + n}) of a prompt of "
                     f"{'?' if prompt >= (1 << 40) else prompt}, output rows [{base}, {base + n})")
        for pos, end, row, slot in reg.runs[reg.run_first[hd]:reg.run_end[hd]].tolist():
            reach = "reached" if pos < lo + n and end > lo else "outside"
            src = reg.item_src[slot]
            if src is None:
                held = "no source held"
            else:
                ent = reg.item_entry[slot]
                held = (f"source {str(src.dtype).replace('torch.', '')} {list(src.shape)} "
                        f"(offset {ent[L.SOURCE_OFF]}, stride {ent[L.SOURCE_STRIDE]}, "
                        f"{'16-byte' if ent[L.SOURCE_ALIGNED] else 'element'} loads)")
            lines.append(f"    positions [{pos}, {end}) <- rows [{row}, {row + end - pos}) of item "
                         f"{reg.item_key[slot]!r} ({reg.item_modality[slot]}): {held}; {reach}")
        base += n
    return "\n".join(lines)
