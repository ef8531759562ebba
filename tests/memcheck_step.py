"""A batch for compute-sanitizer memcheck of the step kernel: largest hidden, ragged tails,
deepstack, mixed dtypes and strides, fused and scatter mode, graph replay, searches of
several rounds (more requests and more runs than a round's keys), the one-block shapes of
widths 1024 does not divide (3584, 2560, 1536), and small steps run at halved rows.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/memcheck_step.py
"""

import torch

from mmassembler import Assembler, Item, Request, assemble_oracle


def main() -> None:
    dev = "cuda"
    torch.manual_seed(0)
    for hidden, ds, graph, num_req, num_items in (
            (8192, 0, False, 5, 3), (3584, 7168, False, 5, 3), (1000, 0, False, 5, 3),
            (17, 34, False, 5, 3), (4096, 0, True, 5, 3), (1000, 2000, True, 5, 3),
            (256, 0, False, 40, 300), (256, 512, True, 40, 300),
            (3584, 0, False, 5, 3), (2560, 0, True, 5, 3), (1536, 0, False, 40, 300)):
        weight = torch.randn(64, hidden, device=dev, dtype=torch.bfloat16)
        reqs = []
        for r in range(num_req):
            items, pos = [], r
            for k in range(num_items if r % 7 == 0 else 3):
                rows = 13 + 29 * ((r + k) % 4) if num_items == 3 else 1 + (r + k) % 3
                width = hidden + (ds if ds and k != 1 else 0)
                dtype = (torch.bfloat16, torch.float32, torch.float16)[(r + k) % 3]
                emb = torch.randn(rows, width + 5, device=dev).to(dtype)[:, :width]
                items.append(Item((hidden, r, k), [(pos, pos + rows - 1)], embedding=emb))
                pos += rows + (3 if num_items == 3 else k % 2)
            reqs.append((items, pos + 7))
        for fused in (True, False):
            cap = 8192
            out = None if fused else torch.zeros(cap, hidden, device=dev, dtype=torch.bfloat16)
            dsb = torch.zeros(cap, ds, device=dev, dtype=torch.bfloat16) if ds else None
            asm = Assembler(weight=weight if fused else None, hidden=hidden, dtype=torch.bfloat16,
                            device=dev, max_tokens=cap, max_requests=num_req, deepstack_cols=ds,
                            cuda_graph=graph, out=out if graph else None,
                            deepstack_out=dsb if graph else None)
            handles = [asm.add_request(items, prompt_len=n) for items, n in reqs]
            for lo, hi in ((0, 0.37), (0.37, 1.0)):
                p = [int(n * lo) for _, n in reqs]
                e = [int(n * hi) - int(n * lo) for _, n in reqs]
                t = sum(e)
                ids = torch.randint(-3, 70, (t,), device=dev)
                kw = {}
                if not graph:
                    kw = dict(out=None if fused else out[:t], deepstack_out=dsb[:t] if ds else None)
                got = asm.assemble(handles, p, e, ids, **kw)
                torch.cuda.synchronize()
                want, _ = assemble_oracle([Request(it, a, b) for (it, _), a, b in zip(reqs, p, e)],
                                          ids.cpu(), lambda it: it.embedding.cpu(),
                                          weight=weight.cpu() if fused else None,
                                          out=None if fused else got.cpu().clone())
                if fused:
                    assert torch.equal(got.cpu(), want.to(torch.bfloat16)), (hidden, ds, graph)
    print("memcheck batch done")


if __name__ == "__main__":
    main()
