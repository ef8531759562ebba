"""CUDA-graph mode: the step (table copy + kernel) captured once, replayed for many steps."""

import numpy as np
import pytest
import torch

from mmkernels.tables import STAGING_RING
from mmassembler import Assembler, BatchShapeError, EmbeddingCache, Item, Request, assemble_oracle

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _requests(seed, hidden, device):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for r in range(3 + seed % 3):
        pos, items = 3 + r, []
        for k in range(1 + (seed + r) % 3):
            rows = 20 + 7 * ((seed + k + r) % 5)
            dtype = (torch.bfloat16, torch.float32, torch.float16)[k % 3]
            if k == 1:  # encoded
                items.append(Item((seed, r, k), [(pos, pos + rows - 1)], data=rows))
            else:
                emb = torch.randn(rows, hidden + 3, generator=g).to(device, dtype)[:, :hidden]
                items.append(Item((seed, r, k), [(pos, pos + rows - 1)], embedding=emb))
            pos += rows + 5
        reqs.append((items, pos + 4))
    return reqs


@needs_cuda
@pytest.mark.parametrize("fused", [True, False])
def test_capture_once_replay_many_steps(fused):
    torch.manual_seed(0)
    hidden, dev = 256, "cuda"
    weight = torch.randn(100, hidden, device=dev).bfloat16()

    def encode(items):
        return [torch.full((it.data, hidden), float(sum(it.key)), device=dev) for it in items]

    persistent = None if fused else torch.zeros(2048, hidden, device=dev, dtype=torch.bfloat16)
    asm = Assembler(weight=weight if fused else None, hidden=hidden, dtype=torch.bfloat16, device=dev,
                    max_tokens=2048, max_requests=8, cuda_graph=True, out=persistent,
                    encoders={"image": encode}, cache=EmbeddingCache(1 << 24))
    replays = 0
    for seed in range(4):  # new requests each time; each run over two chunks
        reqs = _requests(seed, hidden, dev)
        handles = [asm.add_request(items, prompt_len=n) for items, n in reqs]
        for lo_frac, hi_frac in ((0, 0.5), (0.5, 1.0)):
            p = [int(n * lo_frac) for _, n in reqs]
            e = [int(n * hi_frac) - int(n * lo_frac) for _, n in reqs]
            ids = torch.randint(-5, 120, (sum(e),), device=dev)
            if not fused:
                persistent[:sum(e)] = weight[ids.clamp(0, 99)]
                before = persistent[:sum(e)].clone()
            got = asm.assemble(handles, p, e, ids)
            replays += 1
            torch.cuda.synchronize()
            requests = [Request(items, a, b) for (items, _), a, b in zip(reqs, p, e)]
            want, _ = assemble_oracle(
                requests, ids.cpu(),
                lambda it: it.embedding.cpu() if it.embedding is not None else torch.full(
                    (it.data, hidden), float(sum(it.key))),
                weight=weight.cpu() if fused else None, out=None if fused else before.cpu())
            assert torch.equal(got.cpu(), want.to(torch.bfloat16)), (seed, lo_frac)
            if not fused:
                assert got.data_ptr() == persistent.data_ptr()
        for h in handles:
            asm.remove_request(h)
    assert replays >= 3 and asm._graph.graphs is not None and len(asm._graph.graphs) == STAGING_RING


@needs_cuda
def test_graph_mode_rejects_per_call_buffers_before_writing():
    asm = Assembler(weight=torch.randn(10, 16, device="cuda"), max_tokens=64, max_requests=2,
                    cuda_graph=True)
    h = asm.add_request([], prompt_len=8)
    with pytest.raises(BatchShapeError):
        asm.assemble([h], [0], [4], torch.zeros(4, dtype=torch.int64, device="cuda"),
                     out=torch.zeros(4, 16, device="cuda"))
    got = asm.assemble(np.array([h]), np.array([0]), np.array([4]),
                       torch.tensor([1, 2, 3, 4], device="cuda"))
    assert torch.equal(got, asm.weight[torch.tensor([1, 2, 3, 4], device="cuda")])


def test_graph_mode_needs_a_gpu_backend():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    from mmassembler import BackendUnavailableError

    with pytest.raises(BackendUnavailableError):
        Assembler(weight=torch.randn(10, 16), max_tokens=64, max_requests=2, cuda_graph=True)
