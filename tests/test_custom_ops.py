"""torch.compile calls the device ops as custom ops: no graph breaks, same results."""

import torch
from torch import nn

import mmkernels


class EmbedWithImages(nn.Module):
    """A toy model front end: token embedding plus image rows, through mmkernels."""

    def __init__(self, vocab: int = 50, hidden: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)

    def forward(self, ids, image_a, image_b, segments):
        fused = mmkernels.embed_and_gather(ids, self.embed.weight, [image_a, image_b], segments)
        scattered = self.embed(ids.clamp(0, self.embed.num_embeddings - 1))
        mmkernels.gather_rows(scattered, [image_a, image_b], segments)
        return fused * 2 + scattered  # some work around the op, as a model would do


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-3, 60, (30,), generator=g)
    a, b = torch.randn(6, 16, generator=g), torch.randn(9, 16, generator=g)
    segments = torch.tensor([[0, 0, 2, 6], [1, 3, 12, 6], [0, 5, 29, 1]])
    return ids, a, b, segments


@torch.no_grad()  # inference, as engines run it: the ops register no autograd formula
def test_compiles_without_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    model = EmbedWithImages()
    args = _inputs()
    want = model(*args)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    got = compiled(*args)
    assert torch.equal(got, want)
    explanation = torch._dynamo.explain(model)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_custom_ops_are_registered_with_mutation_and_fake_shapes():
    ids, a, b, segments = _inputs()
    out = torch.zeros(30, 16)
    torch.ops.mmkernels.gather_rows(out, [a, b], segments, None)
    assert torch.equal(out[2:8], a) and torch.equal(out[12:18], b[3:9])
    schema = str(torch.ops.mmkernels.gather_rows.default._schema)
    assert "Tensor(a0!) out" in schema  # declared as mutated
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.ops.mmkernels.embed_and_gather(torch.empty(30, dtype=torch.long),
                                                    torch.empty(50, 16), [torch.empty(6, 16)],
                                                    torch.empty(1, 4, dtype=torch.long), None)
        assert fake.shape == (30, 16)


@torch.no_grad()
def test_compiled_calls_keep_out_backend_and_block_rows():
    """under compile, ``out=`` is written, ``backend`` and ``block_rows``
    reach the op, and the public functions show their real signatures."""
    import inspect

    torch._dynamo.reset()
    ids, a, b, segments = _inputs()
    weight = torch.randn(50, 16)

    def fused_into(buf, ids, a, b, segments):
        got = mmkernels.embed_and_gather(ids, weight, [a, b], segments, out=buf, backend="torch",
                                         block_rows=4)
        return got * 1

    buf = torch.zeros(30, 16)
    got = torch.compile(fused_into, fullgraph=True, backend="aot_eager")(buf, ids, a, b, segments)
    want = mmkernels.embed_and_gather(ids, weight, [a, b], segments.numpy(), backend="torch")
    assert torch.equal(buf, want) and torch.equal(got, want)

    def bad_backend(ids, a, b, segments):
        return mmkernels.embed_and_gather(ids, weight, [a, b], segments, backend="nope")

    torch._dynamo.reset()
    try:
        torch.compile(bad_backend, fullgraph=True, backend="aot_eager")(ids, a, b, segments)
    except Exception as exc:  # noqa: BLE001 - compile wraps errors; the message must be ours
        assert "Invalid backend" in str(exc)
    else:
        raise AssertionError("a bad backend under compile was ignored")
    for fn in (mmkernels.embed_and_gather, mmkernels.gather_rows):
        params = inspect.signature(fn).parameters
        assert {"out" if fn is mmkernels.embed_and_gather else "deepstack_out", "backend",
                "block_rows"} <= set(params) and "kwargs" not in params
