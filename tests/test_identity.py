"""State kept between steps is valid only for the exact thing it was made from: the model
(encoder) and modality a cached row belongs to, the offsets and hash an engine item had,
the weight's storage, the order of a request's items, a stable encoder's buffer. Each test
here reproduces a case that gave silently wrong rows before the fix."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stand_ins import Modality, SgInputs, SgItem
from torch import nn

from mmassembler import (Assembler, AssemblyError, EmbeddingCache, Encoder, Item, Request, assemble,
                         assemble_oracle)
from mmassembler.engines import sglang

H = 8


def _rows(tag: float, n: int = 3) -> torch.Tensor:
    return torch.full((n, H), float(tag))


class _Model:
    """An SGLang multimodal model whose image feature is its own ``tag`` (two models give
    different rows for the same item)."""

    def __init__(self, tag):
        self.tag = tag

    def get_image_feature(self, items):
        return [_rows(self.tag, it.offsets[0][1] - it.offsets[0][0] + 1) for it in items]


def test_two_models_sharing_the_default_cache_read_their_own_rows():
    """the SGLang adapter's process-wide cache, two VLMs, one item key."""
    embed = nn.Embedding(10, H)
    ids = torch.zeros(6, dtype=torch.long)
    with torch.no_grad():
        for tag in (1.0, 2.0, 1.0):
            item = SgItem(Modality.IMAGE, 42, [(1, 3)])
            got, _ = sglang.embed_mm_inputs([SgInputs([item])], [0], [6], ids, embed, _Model(tag))
            assert torch.equal(got[1:4], _rows(tag)), tag


@pytest.mark.parametrize("path", ["stateless", "assembler"])
def test_one_key_in_two_modalities_gets_each_modality_rows(path):
    """an image and an audio clip with one key, each from its own encoder."""
    cache = EmbeddingCache(1 << 20)
    enc = {"image": lambda items: [_rows(1.0) for _ in items], "audio": lambda items: [_rows(2.0) for _ in items]}
    weight = torch.zeros(4, H)
    for modality, tag in (("image", 1.0), ("audio", 2.0)):
        item = Item(7, [(1, 3)], modality=modality)
        ids = torch.zeros(5, dtype=torch.long)
        if path == "stateless":
            got = assemble([Request([item], 0, 5)], ids, weight=weight, encoders=enc, cache=cache)
        else:
            asm = Assembler(weight=weight, max_tokens=8, max_requests=1, encoders=enc, cache=cache)
            got = asm.assemble([asm.add_request([item])], [0], [5], ids)
        assert torch.equal(got[1:4], _rows(tag)), modality


def _sg_step(m, n, embed, ids=None):
    ids = torch.zeros(n, dtype=torch.long) if ids is None else ids
    with torch.no_grad():
        return sglang.embed_mm_inputs([m], [0], [n], ids, embed, cache=None)[0]


def test_offsets_edited_in_place_are_seen():
    """the offsets list of a registered SGLang item changed in place."""
    embed = nn.Embedding(10, H)
    emb = torch.randn(3, H)
    item = SgItem(Modality.IMAGE, 5, [(1, 3)], precomputed_embeddings=emb)
    m = SgInputs([item])
    assert torch.equal(_sg_step(m, 10, embed)[1:4], emb)
    item.offsets[0] = (5, 7)  # in place: the same list object
    got = _sg_step(m, 10, embed)
    assert torch.equal(got[5:8], emb) and torch.equal(got[1:4], embed.weight[[0, 0, 0]])


def test_numpy_and_tensor_offsets_reassigned_are_compared_by_value():
    """offsets given as an array or a tensor, then replaced."""
    embed = nn.Embedding(10, H)
    emb = torch.randn(2, H)
    item = SgItem(Modality.IMAGE, 6, torch.tensor([[1, 2]]), precomputed_embeddings=emb)
    m = SgInputs([item])
    assert torch.equal(_sg_step(m, 8, embed)[1:3], emb)
    item.offsets = __import__("numpy").array([[4, 5]])
    got = _sg_step(m, 8, embed)
    assert torch.equal(got[4:6], emb)
    assert torch.equal(_sg_step(m, 8, embed)[4:6], emb)  # the same again: registered once more, no error


def test_a_new_hash_and_feature_on_the_same_item_object_are_read():
    """an SGLang item whose hash and feature change on the same object."""
    embed = nn.Embedding(10, H)
    model = _Model(1.0)
    item = SgItem(Modality.IMAGE, 11, [(1, 3)])
    m = SgInputs([item])
    ids = torch.zeros(6, dtype=torch.long)
    with torch.no_grad():
        first, _ = sglang.embed_mm_inputs([m], [0], [6], ids, embed, model, cache=None)
        assert torch.equal(first[1:4], _rows(1.0))
        model.tag = 3.0  # the engine re-processed the item: new content, new hash
        item.hash = 12
        second, _ = sglang.embed_mm_inputs([m], [0], [6], ids, embed, model, cache=None)
    assert torch.equal(second[1:4], _rows(3.0))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parameter_data_swapped_reads_the_new_table(device, backend):
    """``Assembler(weight=P)`` then ``P.data = new_table``."""
    p = nn.Parameter(torch.randn(6, H, device=device), requires_grad=False)
    asm = Assembler(weight=p, max_tokens=8, max_requests=1, backend=backend)
    h = asm.add_request([], prompt_len=4)
    ids = torch.tensor([0, 1, 2, 3], device=device)
    assert torch.equal(asm.assemble([h], [0], [4], ids), p[ids])
    p.data = torch.randn(6, H, device=device)  # loaded or swapped: a new storage
    assert torch.equal(asm.assemble([h], [0], [4], ids), p[ids])
    p.data = torch.randn(7, H + 1, device=device)
    with pytest.raises(AssemblyError, match="made for"):
        asm.assemble([h], [0], [4], ids)


def test_parameter_data_swapped_under_the_adapter():
    embed = nn.Embedding(10, H)
    ids = torch.arange(6)
    item = SgItem(Modality.IMAGE, 1, [(1, 2)], precomputed_embeddings=torch.randn(2, H))
    m = SgInputs([item])
    got = _sg_step(m, 6, embed, ids)
    assert torch.equal(got[[0, 3, 4, 5]], embed.weight[[0, 3, 4, 5]])
    embed.weight.data = torch.randn(10, H)
    got = _sg_step(m, 6, embed, ids)
    assert torch.equal(got[[0, 3, 4, 5]], embed.weight[[0, 3, 4, 5]])


def test_items_reordered_between_calls_land_at_their_own_positions():
    """``Request.items`` reordered after the first call, then ``with_window``."""
    a = Item(1, [(0, 1)], embedding=_rows(1.0, 2))
    b = Item(2, [(4, 5)], embedding=_rows(2.0, 2))
    req = Request([a, b], 0, 3, prompt_len=6)
    weight = torch.zeros(2, H)
    assemble([req], torch.zeros(3, dtype=torch.long), weight=weight)
    req.items.reverse()  # the list itself, in place
    got = assemble([req.with_window(3, 3)], torch.zeros(3, dtype=torch.long), weight=weight)
    assert torch.equal(got[1:3], _rows(2.0, 2))


def test_a_stable_buffer_written_in_place_is_caught_by_the_debug_check():
    """a ``stable=True`` encoder's output overwritten while held."""
    buf = _rows(1.0, 2)
    asm = Assembler(weight=torch.zeros(2, H), max_tokens=8, max_requests=1, check_stable=True,
                    encoders={"image": Encoder(lambda items: [buf for _ in items], stable=True)})
    h = asm.add_request([Item(3, [(1, 3), (5, 5)], embed_mask=[True, True, False, False])])
    ids = torch.zeros(4, dtype=torch.long)
    asm.assemble([h], [0], [2], ids[:2])  # reads rows 0 and 1: the source stays held
    buf.add_(1)  # breaks the contract
    with pytest.raises(AssemblyError, match="written in place"):
        asm.assemble([h], [2], [2], ids[:2])


@pytest.mark.parametrize("write", ["data", "numpy", "no_grad", "add_"])
def test_a_stable_buffer_written_in_place_however_is_caught_by_the_debug_check(write):
    """Writes that do not bump the version counter (``.data``, ``.numpy()``) are caught too:
    the debug check compares the held rows' values."""
    buf = _rows(1.0, 2)
    asm = Assembler(weight=torch.zeros(2, H), max_tokens=8, max_requests=1, check_stable=True,
                    encoders={"image": Encoder(lambda items: [buf for _ in items], stable=True)})
    h = asm.add_request([Item(3, [(1, 3), (5, 5)], embed_mask=[True, True, False, False])])
    ids = torch.zeros(4, dtype=torch.long)
    asm.assemble([h], [0], [2], ids[:2])
    asm.assemble([h], [0], [2], ids[:2])  # unchanged: no error
    if write == "data":
        buf.data[1, 0] = 7.0
    elif write == "numpy":
        buf.numpy()[1, 0] = 7.0
    elif write == "no_grad":
        with torch.no_grad():
            buf[1, 0] = 7.0
    else:
        buf.add_(1)
    with pytest.raises(AssemblyError, match="written in place"):
        asm.assemble([h], [2], [2], ids[:2])


@st.composite
def _two_model_batches(draw):
    keys = draw(st.lists(st.integers(0, 3), min_size=1, max_size=6))
    mods = [draw(st.sampled_from(["image", "audio"])) for _ in keys]
    models = [draw(st.sampled_from([0, 1])) for _ in keys]
    return list(zip(keys, mods, models))


@settings(max_examples=30)
@given(batch=_two_model_batches())
def test_two_models_two_modalities_colliding_keys_share_one_cache(batch):
    """Property: items of two models and two modalities with colliding keys, through one
    cache, in any order: each gets its own model's rows for its modality (≡ the oracle)."""
    cache = EmbeddingCache(1 << 20)

    def encoder(model, modality):
        return lambda items: [_rows(100 * model + 10 * (modality == "audio") + it.key, 2) for it in items]

    asms = [Assembler(weight=torch.zeros(2, H), max_tokens=4, max_requests=1, cache=cache,
                      encoders={m: encoder(k, m) for m in ("image", "audio")}) for k in (0, 1)]
    for key, modality, model in batch:
        item = Item(key, [(1, 2)], modality=modality)
        asm = asms[model]
        h = asm.add_request([item], 4)
        got = asm.assemble([h], [0], [4], torch.zeros(4, dtype=torch.long))
        asm.remove_request(h)
        want, _ = assemble_oracle([Request([item], 0, 4)], torch.zeros(4, dtype=torch.long),
                                  lambda it: _rows(100 * model + 10 * (modality == "audio") + key, 2),
                                  weight=torch.zeros(2, H))
        assert torch.equal(got, want)


def test_vllm_out_is_written_only_after_every_check():
    """a feature missing from the encoder cache, with out= and embed_tokens=."""
    from stand_ins import Feature, PlaceholderRange, RunnerRequest

    from mmassembler import MissingEncoderError
    from mmassembler.engines import gather_mm_embeddings

    req = RunnerRequest(0, 6, [Feature("gone", PlaceholderRange(1, 3))])
    req.req_id = "r"
    out = torch.full((6, H), 7.0)
    with pytest.raises(MissingEncoderError):
        gather_mm_embeddings([req], {}, torch.zeros(6, dtype=torch.long), embed_tokens=_Scaled(10, H), out=out)
    assert torch.equal(out, torch.full((6, H), 7.0))
    with pytest.raises(AssemblyError):  # an out of the wrong row count is typed too
        gather_mm_embeddings([req], {"gone": _rows(1.0)}, torch.zeros(6, dtype=torch.long),
                             embed_tokens=_Scaled(10, H), out=torch.zeros(5, H))


class _Scaled(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2


def test_a_bound_method_as_embed_tokens_keeps_one_assembler():
    """``model.get_language_model().embed_input_ids`` is a new bound method
    at every access; the adapter keys on its instance and function."""
    from stand_ins import Feature, PlaceholderRange, RunnerRequest

    from mmassembler.engines import _resident, gather_mm_embeddings

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, H)

        def embed_input_ids(self, ids):
            return self.embed(ids) * 3

    lm = LM()
    built = []
    real = _resident.Resident._build

    def counting(self, *a, **kw):
        built.append(1)
        return real(self, *a, **kw)

    _resident.Resident._build = counting
    try:
        req = RunnerRequest(0, 6, [Feature("x", PlaceholderRange(1, 3))])
        req.req_id = "r"
        with torch.no_grad():
            for _ in range(5):
                got = gather_mm_embeddings([req], {"x": _rows(4.0)}, torch.zeros(6, dtype=torch.long),
                                           embed_tokens=lm.embed_input_ids)
    finally:
        _resident.Resident._build = real
    assert len(built) == 1 and torch.equal(got[1:4], _rows(4.0))


def test_a_handle_twice_fails_on_the_steady_path_as_on_the_slow_one():
    """A handle given twice is a BatchShapeError whether or not the step needs work."""
    asm = Assembler(weight=torch.zeros(3, H), max_tokens=16, max_requests=2)
    h = asm.add_request([Item(1, [(0, 1)], embedding=_rows(1.0, 2))], 8)
    ids = torch.zeros(4, dtype=torch.long)
    asm.assemble([h], [0], [4], ids)  # resolved: the next step with these windows is steady
    with pytest.raises(AssemblyError, match="twice"):
        asm.assemble([h, h], [0, 0], [2, 2], ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_cuda_graph_is_captured_again_when_the_weight_moves():
    """Parameter.data swapped under graph replay: a graph keeps the address it captured."""
    p = nn.Parameter(torch.randn(6, H, device="cuda"), requires_grad=False)
    asm = Assembler(weight=p, max_tokens=8, max_requests=1, cuda_graph=True)
    h = asm.add_request([], 4)
    ids = torch.arange(4, device="cuda")
    assert torch.equal(asm.assemble([h], [0], [4], ids), p[ids])
    p.data = torch.randn(6, H, device="cuda")
    assert torch.equal(asm.assemble([h], [0], [4], ids), p[ids])


@settings(max_examples=40)
@given(data=st.data())
def test_engine_objects_mutated_between_steps_give_right_rows(data):
    """Property: an SGLang request whose items are mutated in place between steps (offsets
    edited, hashes and features changed, precomputed tensors replaced, the embedding's
    Parameter.data swapped) assembles, every step, what the engine's state says now."""
    embed = nn.Embedding(6, H)
    n_items = data.draw(st.integers(1, 3))
    items = [SgItem(Modality.IMAGE, 100 + j, [(1 + 5 * j, 3 + 5 * j)], precomputed_embeddings=_rows(j, 3))
             for j in range(n_items)]
    m = SgInputs(items)
    n = 5 * n_items + 2
    ids = torch.arange(n) % 6
    for step in range(data.draw(st.integers(1, 5))):
        what = data.draw(st.sampled_from(["none", "offsets", "hash", "tensor", "weight"]))
        j = data.draw(st.integers(0, n_items - 1))
        if what == "offsets":
            s = 1 + 5 * j + data.draw(st.integers(0, 1))
            items[j].offsets[0] = (s, s + 2)  # in place
        elif what == "hash":
            items[j].hash += 1000
            items[j].precomputed_embeddings = _rows(50 + step, 3)
        elif what == "tensor":
            items[j].precomputed_embeddings = _rows(90 + step, 3)
        elif what == "weight":
            embed.weight.data = torch.randn(6, H)
        with torch.no_grad():
            got, _ = sglang.embed_mm_inputs([m], [0], [n], ids, embed, cache=None)
        want, _ = assemble_oracle([Request([Item(it.hash, list(it.offsets), embedding=it.precomputed_embeddings)
                                            for it in items], 0, n)], ids, lambda it: it.embedding,
                                  weight=embed.weight.detach())
        assert torch.equal(got, want), (step, what)
