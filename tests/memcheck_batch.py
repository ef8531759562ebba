"""A test batch for ``compute-sanitizer --tool memcheck`` (not collected by pytest).

The device ops on a batch's segments (the step kernel over one-request tables), and the
stateless ``assemble`` (one step of several requests whose windows cut through items,
interleaved and masked items): largest hidden size, ragged tails (rows and columns that
do not fill a block), strided and mixed-dtype sources, fused and scatter mode, deepstack;
each checked against the reference. The Assembler's resident tables and graph replay:
``tests/memcheck_step.py``.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/memcheck_batch.py
"""

import torch

from mmassembler import Item, Request, assemble
from mmkernels import embed_and_gather, embed_and_gather_ref, gather_rows, gather_rows_ref, check_segments


def stateless(dev: str, g: torch.Generator) -> None:
    """Chunked windows over several requests through ``assemble`` on the step kernel."""
    for hidden, ds in ((8192, 0), (3584, 7168), (17, 34)):
        def emb(rows, dtype):
            return torch.randn(rows, hidden + ds, generator=g).to(dtype).to(dev)

        a = Item(1, [(3, 40), (50, 51)], embedding=emb(40, torch.bfloat16))
        b = Item(2, [(41, 45), (60, 300)], embedding=emb(246, torch.float32)[:, :hidden + ds])
        m = Item(3, [(301, 310)], embedding=emb(6, torch.float16),
                 embed_mask=[True, False, True, True, False, True, True, False, True, False])
        c = Item(4, [(0, 99)], embedding=emb(100, torch.bfloat16))
        reqs = [Request([a, b, m], 30, 250, prompt_len=320), Request([c], 0, 0, prompt_len=100),
                Request([c], 17, 83, prompt_len=100), Request([a, b, m], 280, 40, prompt_len=320)]
        n = sum(r.extend_len for r in reqs)
        w = torch.randn(77, hidden, generator=g).bfloat16().to(dev)
        ids = torch.randint(-3, 90, (n,), generator=g).to(dev)
        for block_rows in (None, 1, 64):
            dso = torch.zeros(n, ds, device=dev).bfloat16() if ds else None
            dsr = torch.zeros(n, ds, device=dev).bfloat16() if ds else None
            got = assemble(reqs, ids, weight=w, deepstack_out=dso, block_rows=block_rows, backend="triton")
            want = assemble(reqs, ids, weight=w, deepstack_out=dsr, backend="torch")
            assert torch.equal(got, want) and (ds == 0 or torch.equal(dso, dsr))
            out = torch.randn(n, hidden, generator=g).bfloat16().to(dev)
            ref = out.clone()
            assemble(reqs, ids, out=out, deepstack_out=dso, block_rows=block_rows, backend="triton")
            assemble(reqs, ids, out=ref, deepstack_out=dsr, backend="torch")
            assert torch.equal(out, ref) and (ds == 0 or torch.equal(dso, dsr))


def main() -> None:
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    for hidden, ds in ((8192, 0), (3584, 7168), (1000, 0), (17, 34)):
        srcs = [torch.randn(37, hidden + ds + 3, generator=g).bfloat16().to(dev)[:, : hidden + ds],
                torch.randn(300, hidden + ds, generator=g).to(dev),
                torch.randn(5, hidden, generator=g).half().to(dev)]
        segs = [(0, 1, 3, 36), (1, 0, 41, 299), (2, 4, 345, 1), (1, 299, 400, 1)]
        n = 403
        w = torch.randn(77, hidden, generator=g).bfloat16().to(dev)
        ids = torch.randint(-3, 90, (n,), generator=g).to(dev)
        for block_rows in (None, 1, 64):
            dso = torch.zeros(n, ds, device=dev).bfloat16() if ds else None
            dsr = torch.zeros(n, ds, device=dev).bfloat16() if ds else None
            got = embed_and_gather(ids, w, srcs, segs, deepstack_out=dso, block_rows=block_rows,
                                   backend="triton")
            want = embed_and_gather_ref(ids, w, srcs, check_segments(segs, srcs, n),
                                        deepstack_out=dsr)
            assert torch.equal(got, want) and (ds == 0 or torch.equal(dso, dsr))
            out = torch.randn(n, hidden, generator=g).bfloat16().to(dev)
            ref = out.clone()
            gather_rows(out, srcs, segs, deepstack_out=dso, block_rows=block_rows, backend="triton")
            gather_rows_ref(ref, srcs, check_segments(segs, srcs, n), deepstack_out=dsr)
            assert torch.equal(out, ref) and (ds == 0 or torch.equal(dso, dsr))
    stateless(dev, g)
    torch.cuda.synchronize()
    print("memcheck batch: all launches matched the reference")


if __name__ == "__main__":
    main()
