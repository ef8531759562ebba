"""The SGLang adapter on the resident Assembler: a request registers once, re-registers
only when its items change, and goes when the engine drops it."""

import gc

import torch
from mmassembler.testing import count_calls
from stand_ins import Modality, SgInputs, SgItem
from torch import nn

from mmassembler import assemble_oracle
from mmassembler.items import Item, Request
from mmassembler.engines import sglang
from mmassembler.engines._resident import MIN_REQUESTS, resident_for

H = 6


def _items(n, start=2, rows=3):
    return [SgItem(Modality.IMAGE, 100 + i, [(start + 5 * i, start + 5 * i + rows - 1)],
                   precomputed_embeddings=torch.randn(rows, H)) for i in range(n)]


def _want(inputs, prefix, extend, ids, embed):
    reqs = [Request([Item(it.hash, it.offsets, embedding=it.precomputed_embeddings) for it in m.mm_items],
                    p, e) for m, p, e in zip(inputs, prefix, extend)]
    return assemble_oracle(reqs, ids, lambda it: it.embedding, weight=embed.weight)[0]


def _step(inputs, prefix, extend, embed):
    ids = torch.randint(0, 10, (sum(extend),))
    with torch.no_grad():
        got, _ = sglang.embed_mm_inputs(inputs, prefix, extend, ids, embed, cache=None)
    assert torch.equal(got, _want(inputs, prefix, extend, ids, embed))


def _registered(embed):
    return int(resident_for(embed, embed.weight, embed.weight, 0, "auto").asm.registry.num_live)


def test_registers_once_across_chunks_and_removes_dropped_requests(monkeypatch):
    embed = nn.Embedding(10, H)
    a, b = SgInputs(_items(3)), SgInputs(_items(2))
    res = resident_for(embed, embed.weight, embed.weight, 0, "auto")
    adds = []
    real_add = res.asm.add_requests
    monkeypatch.setattr(res.asm, "add_requests", lambda new: adds.extend(new.counts) or real_add(new))
    for prefix in (0, 6, 12):  # three chunks of both requests
        _step([a, b], [prefix, prefix], [6, 6], embed)
    assert len(adds) == 2  # registered together at the first step, never again
    assert _registered(embed) == 2
    del a
    gc.collect()
    _step([b], [12], [3], embed)
    assert _registered(embed) == 1  # a's handle went at the step after the engine dropped it


def test_changed_items_are_registered_again_never_read_at_old_positions():
    embed = nn.Embedding(10, H)
    m = SgInputs(_items(2))
    _step([m], [0], [14], embed)
    m.mm_items[0].offsets = [(0, 2)]  # moved (SGLang's EVS rewrites placeholder spans)
    _step([m], [0], [14], embed)
    m.mm_items[1].precomputed_embeddings = torch.randn(3, H)  # replaced (offloaded, re-sent)
    _step([m], [0], [14], embed)
    m.mm_items.append(_items(3)[2])  # one more item
    _step([m], [0], [16], embed)
    assert _registered(embed) == 1


def test_text_only_requests_and_capacity_growth():
    embed = nn.Embedding(10, H)
    n = MIN_REQUESTS + 5
    inputs = [SgInputs(_items(1)) if i % 2 else None for i in range(n)]
    prefix, extend = [0] * n, [5] * n
    ids = torch.randint(0, 10, (sum(extend),))
    with torch.no_grad():
        got, _ = sglang.embed_mm_inputs(inputs, prefix, extend, ids, embed, cache=None)
    empty = SgInputs([])
    want = _want([m or empty for m in inputs], prefix, extend, ids, embed)
    assert torch.equal(got, want)
    assert resident_for(embed, embed.weight, embed.weight, 0, "auto").asm.max_requests >= n


def test_stable_encoder_outputs_are_read_in_place_and_not_cached():
    from mmassembler import Assembler, EmbeddingCache
    from mmassembler.encode import Encoder

    outputs = {7: torch.randn(3, H)}
    cache = EmbeddingCache(1 << 20)
    asm = Assembler(hidden=H, dtype=torch.float32, device="cpu", max_tokens=16, max_requests=2,
                    encoders={"image": Encoder(lambda items: [outputs[it.key] for it in items], stable=True)},
                    cache=cache)
    h = asm.add_request([Item(7, [(1, 3)])], 6)
    out = torch.zeros(6, H)
    asm.assemble([h], [0], [6], out=out)
    assert torch.equal(out[1:4], outputs[7]) and len(cache) == 0
    assert any(t is not None and t.data_ptr() == outputs[7].data_ptr() for t in asm.registry.held_sources())


def test_vllm_feature_missing_from_the_encoder_cache_names_request_and_identifier():
    import pytest
    from stand_ins import Feature, PlaceholderRange, RunnerRequest

    from mmassembler import MissingEncoderError
    from mmassembler.engines import gather_mm_embeddings

    req = RunnerRequest(0, 5, [Feature("img-1", PlaceholderRange(1, 3))])
    req.req_id = "req-9"
    weight = torch.randn(3, H)
    with pytest.raises(MissingEncoderError, match="req-9.*img-1"):
        gather_mm_embeddings([req], {}, torch.zeros(5, dtype=torch.long), embed_tokens=weight)


def test_a_request_with_more_items_than_the_tables_hold_grows_them():
    embed = nn.Embedding(10, H)
    res = resident_for(embed, embed.weight, embed.weight, 0, "auto")
    many = res.asm.registry.max_items * 3  # three times the item table
    items = [SgItem(Modality.IMAGE, 100 + i, [(2 * i, 2 * i)], precomputed_embeddings=torch.randn(1, H))
             for i in range(many)]
    _step([SgInputs(items)], [0], [2 * many], embed)


def test_vllm_changed_placement_is_registered_again():
    from stand_ins import Feature, PlaceholderRange, RunnerRequest

    from mmassembler.engines import gather_mm_embeddings

    emb = torch.randn(3, H)
    feat = Feature("x", PlaceholderRange(2, 3))
    req = RunnerRequest(0, 8, [feat])
    weight = torch.randn(5, H)
    ids = torch.zeros(8, dtype=torch.long)
    first = gather_mm_embeddings([req], {"x": emb}, ids, embed_tokens=weight)
    assert torch.equal(first[2:5], emb)
    feat.mm_position = PlaceholderRange(4, 3)  # moved
    second = gather_mm_embeddings([req], {"x": emb}, ids, embed_tokens=weight)
    assert torch.equal(second[4:7], emb) and torch.equal(second[2:4], weight[ids[2:4]])
    feat.mm_position.is_embed = torch.tensor([True, False, True])  # masked in place: a new mask object
    third = gather_mm_embeddings([req], {"x": emb[:2]}, ids, embed_tokens=weight)
    assert torch.equal(third[[4, 6]], emb[:2]) and torch.equal(third[5], weight[0])


def test_steady_adapter_step_python_calls_do_not_grow_with_items():
    """Once registered, a request costs the adapter a snapshot per step (a comprehension
    over its items, no Python call per item), so the step's Python calls are the same at
    1 item per request as at 64."""
    def calls(items_per_request):
        embed = nn.Embedding(10, H)
        reqs = [SgInputs([SgItem(Modality.IMAGE, 1000 * r + i, [(3 * i, 3 * i + 1)],
                                 precomputed_embeddings=torch.randn(2, H)) for i in range(items_per_request)])
                for r in range(4)]
        n = 3 * items_per_request
        ids = torch.randint(0, 10, (4 * n,))
        step = lambda: sglang.embed_mm_inputs(reqs, [0] * 4, [n] * 4, ids, embed, cache=None)  # noqa: E731
        with torch.no_grad():
            step()
            step()
            return count_calls(step, events=("call",))

    assert calls(1) == calls(64)
