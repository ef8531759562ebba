"""CUDA-graph mode: fixed buffers, counts read on the device, replay with new batches.

On a GPU the launch is captured once and replayed for two different batches; on a CPU
the same fixed-buffer launch runs through the interpreter for several batches in a row.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import batches

from mmassembler import BatchShapeError, GraphAssembler, Item, Request, assemble, assemble_oracle

pytestmark = pytest.mark.interpreter


def _embedding(item):
    return item.embedding


@settings(max_examples=8)
@given(data=st.data())
def test_fixed_buffers_serve_successive_batches(device, data):
    hidden = data.draw(st.integers(1, 48))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    weight = torch.randn(20, hidden).to(dtype).to(device)
    ga = GraphAssembler(max_tokens=200, max_segments=40, weight=weight)
    for _ in range(3):  # the same launcher, new metadata each time
        batch = data.draw(batches(max_requests=3, max_items=2, max_span=6, device=device).filter(
            lambda b: b.num_tokens <= 200))
        reqs = [Request([Item(it.key, it.spans, embedding=torch.randn(it.num_rows, hidden).to(device),
                              embed_mask=it.embed_mask) for it in r.items],
                        r.prefix_len, r.extend_len, r.prompt_len) for r in batch.requests]
        ids = batch.input_ids.clamp(-3, 22)
        n = ga.prepare(reqs, ids)
        ga.launch()
        want, _ = assemble_oracle(reqs, ids, _embedding, weight=weight)
        assert torch.equal(ga.out[:n], want)


def test_capacity_is_checked_before_any_write(device):
    weight = torch.randn(5, 8, device=device)
    ga = GraphAssembler(max_tokens=16, max_segments=3, weight=weight)
    ga.out.fill_(7.0)
    too_long = [Request([], 0, 17)]
    with pytest.raises(BatchShapeError, match="max_tokens"):
        ga.prepare(too_long, torch.zeros(17, dtype=torch.long, device=device))
    many = [Request([Item(k, [(2 * k, 2 * k)], embedding=torch.ones(1, 8, device=device))
                     for k in range(4)], 0, 10)]
    with pytest.raises(BatchShapeError, match="max_segments"):
        ga.prepare(many, torch.zeros(10, dtype=torch.long, device=device))
    assert torch.equal(ga.out, torch.full((16, 8), 7.0, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_capture_once_replay_two_batches():
    torch.manual_seed(0)
    hidden = 256
    weight = torch.randn(100, hidden, device="cuda").bfloat16()
    ga = GraphAssembler(max_tokens=2048, max_segments=256, weight=weight)

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        reqs = []
        for r in range(4):
            pos, items = 3 + r, []
            for k in range(2 + r % 2):
                rows = 20 + 7 * ((seed + k + r) % 5)
                dtype = torch.bfloat16 if k % 2 else torch.float32
                emb = torch.randn(rows, hidden, generator=g).to("cuda", dtype)
                items.append(Item(seed * 100 + r * 10 + k, [(pos, pos + rows - 1)], embedding=emb))
                pos += rows + 5
            reqs.append(Request(items, seed % 7, pos - seed % 7))
        n = sum(r.extend_len for r in reqs)
        return reqs, torch.randint(-5, 120, (n,), generator=g).cuda()

    reqs, ids = batch(1)
    ga.prepare(reqs, ids)
    ga.launch()  # warm-up compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ga.launch()
    for seed in (2, 3):
        reqs, ids = batch(seed)
        n = ga.prepare(reqs, ids)
        graph.replay()
        torch.cuda.synchronize()
        want = assemble(reqs, ids, weight=weight, backend="torch")
        assert torch.equal(ga.out[:n], want), seed
