"""A batch for compute-sanitizer memcheck of the step kernel: largest hidden, ragged tails,
deepstack, mixed dtypes and strides, fused and scatter mode, and graph replay.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/memcheck_step.py
"""

import torch

from mmassembler import Assembler, Item, Request, assemble_oracle


def main() -> None:
    dev = "cuda"
    torch.manual_seed(0)
    for hidden, ds, graph in ((8192, 0, False), (3584, 7168, False), (1000, 0, False), (17, 34, False),
                              (4096, 0, True), (1000, 2000, True)):
        weight = torch.randn(64, hidden, device=dev, dtype=torch.bfloat16)
        reqs = []
        for r in range(5):
            items, pos = [], r
            for k in range(3):
                rows = 13 + 29 * ((r + k) % 4)
                width = hidden + (ds if ds and k != 1 else 0)
                dtype = (torch.bfloat16, torch.float32, torch.float16)[(r + k) % 3]
                emb = torch.randn(rows, width + 5, device=dev).to(dtype)[:, :width]
                items.append(Item((hidden, r, k), [(pos, pos + rows - 1)], embedding=emb))
                pos += rows + 3
            reqs.append((items, pos + 7))
        for fused in (True, False):
            out = None if fused else torch.zeros(4096, hidden, device=dev, dtype=torch.bfloat16)
            dsb = torch.zeros(4096, ds, device=dev, dtype=torch.bfloat16) if ds else None
            asm = Assembler(weight=weight if fused else None, hidden=hidden, dtype=torch.bfloat16,
                            device=dev, max_tokens=4096, max_requests=8, deepstack_cols=ds,
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
