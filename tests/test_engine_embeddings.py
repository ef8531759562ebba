"""Adapters never bypass the engine's embedding module, keep nothing on engine objects,
and key their state by the objects themselves."""

import gc

import pytest
from types import SimpleNamespace

import torch

from stand_ins import ScaledEmbedding, ShardEmbedding, sg_item

from mmassembler.engines import embed_input_ids, embed_mm_inputs, gather_mm_embeddings

H, V = 8, 20


def _sglang(embedding, items, ids, encoder=None, rows_fn=None):
    """One chunk through the adapter, without a cache (tests give one hash other contents)."""
    mm = SimpleNamespace(mm_items=items)
    enc = encoder or (lambda its: [torch.full((3, H), float(it.hash)) for it in its])
    with torch.no_grad():
        return embed_mm_inputs([mm], [0], [ids.shape[0]], ids, embedding,
                               data_embedding_func_mapping={"image": enc}, rows_fn=rows_fn,
                               cache=None)[0]


def test_sglang_scaled_and_sharded_embeddings_compute_text_rows():
    torch.manual_seed(0)
    ids = torch.randint(0, V, (10,))
    for module in (ScaledEmbedding(V, H), ShardEmbedding(torch.randn(V, H))):
        got = _sglang(module, [sg_item(7, [(2, 4)])], ids)
        with torch.no_grad():
            want = module(ids).clone()
        want[2:5] = 7.0
        assert torch.equal(got, want), type(module).__name__


def test_vllm_embed_tokens_callable_or_sharded_is_called_not_read():
    torch.manual_seed(0)
    full = torch.randn(V, H)
    ids = torch.randint(0, V, (10,))
    mask = torch.zeros(10, dtype=torch.bool)
    mask[3:6] = True
    mm = [torch.ones(3, H)]
    emb = torch.nn.Embedding(V, H)
    for embed in (ShardEmbedding(full), lambda x: emb(x) * 3.0, ScaledEmbedding(V, H)):
        with torch.no_grad():
            want = embed(ids).clone()
            want[3:6] = 1.0
            assert torch.equal(embed_input_ids(ids, mm, is_multimodal=mask, embed_tokens=embed), want)
            feat = SimpleNamespace(identifier="a", mm_position=SimpleNamespace(offset=3, length=3, is_embed=None))
            req = SimpleNamespace(num_computed_tokens=0, num_scheduled_tokens=10, mm_features=[feat])
            got = gather_mm_embeddings([req], {"a": mm[0]}, ids, embed_tokens=embed)
            assert torch.equal(got, want)
            out = torch.full((10, H), 5.0)  # out given with embed_tokens: written, text rows included
            assert gather_mm_embeddings([req], {"a": mm[0]}, ids, embed_tokens=embed, out=out) is out
            assert torch.equal(out, want)


def test_sglang_keeps_nothing_on_engine_items_and_follows_moved_offsets():
    item = sg_item(3, [(1, 3)])
    ids = torch.zeros(8, dtype=torch.long)
    emb = torch.nn.Embedding(V, H)
    got = _sglang(emb, [item], ids)
    assert set(vars(item)) == {"hash", "offsets", "modality", "precomputed_embeddings", "feature"}
    assert torch.equal(got[1:4], torch.full((3, H), 3.0))
    item.offsets = [(4, 6)]  # the same item object, placed elsewhere on a later call
    got = _sglang(emb, [item], ids)
    assert torch.equal(got[4:7], torch.full((3, H), 3.0))
    with torch.no_grad():
        assert torch.equal(got[1:4], emb(ids[1:4]))


def test_encoder_classification_survives_reused_ids():
    """A concatenating encoder marks itself; list-returning encoders made after it is freed
    (which may reuse its address) are used as they are."""
    items = [sg_item(1, [(0, 2)]), sg_item(2, [(4, 6)])]
    ids = torch.zeros(8, dtype=torch.long)
    emb = torch.nn.Embedding(V, H)
    concat = lambda its: torch.cat([torch.full((3, H), float(it.hash)) for it in its])  # noqa: E731
    _sglang(emb, items, ids, encoder=concat)
    del concat
    gc.collect()
    for _ in range(50):
        listing = lambda its: [torch.full((3, H), float(it.hash) + 10) for it in its]  # noqa: E731
        got = _sglang(emb, [sg_item(1, [(0, 2)]), sg_item(2, [(4, 6)])], ids, encoder=listing)
        assert torch.equal(got[0:3], torch.full((3, H), 11.0)) and torch.equal(got[4:7], torch.full((3, H), 12.0))
        del listing


def test_sglang_none_batch_deepstack_key_and_default_cache():
    """None in, None out; a use_deepstack mapping always yields the key;
    by default an item cut by two chunks is encoded once."""
    emb = torch.nn.Embedding(V, H)
    assert embed_mm_inputs(None, [], [], torch.zeros(0, dtype=torch.long), emb) is None
    calls = []
    enc = lambda its: calls.append(len(its)) or [torch.full((6, H), 4.0) for _ in its]  # noqa: E731
    item = sg_item(12345, [(2, 7)])
    mm = SimpleNamespace(mm_items=[item])
    model = SimpleNamespace(deepstack_visual_indexes=[0, 1])
    for prefix, extend in ((0, 4), (4, 6)):
        ids = torch.zeros(extend, dtype=torch.long)
        with torch.no_grad():
            out, other = embed_mm_inputs([mm], [prefix], [extend], ids, emb, model,
                                         data_embedding_func_mapping={"image": enc},
                                         use_deepstack={"IMAGE": False})
        assert other["input_deepstack_embeds"].shape == (extend, 2 * H)
    assert calls == [1]  # the second chunk hit the default cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_sglang_precomputed_on_the_cpu_is_moved_once():
    emb = torch.nn.Embedding(V, H).cuda()
    pre = torch.randn(3, H)  # offloaded to the host between chunks
    item = sg_item(9, [(1, 3)], precomputed_embeddings=pre)
    ids = torch.zeros(6, dtype=torch.long, device="cuda")
    with torch.no_grad():
        got = _sglang(emb, [item], ids)
    assert torch.equal(got[1:4].cpu(), pre)


def test_vllm_token_counts_from_the_scheduler_output():
    """vLLM keeps this step's counts in the scheduler output's dict."""
    emb = torch.nn.Embedding(V, H)
    feat = SimpleNamespace(identifier="a", mm_position=SimpleNamespace(offset=1, length=3, is_embed=None))
    reqs = [SimpleNamespace(req_id="r0", num_computed_tokens=0, mm_features=[feat]),
            SimpleNamespace(req_id="r1", num_computed_tokens=2, mm_features=[])]
    ids = torch.randint(0, V, (7,))
    with torch.no_grad():
        want = emb(ids).clone()
        want[1:4] = 2.0
        for counts in ({"r1": 3, "r0": 4}, [4, 3]):
            got = gather_mm_embeddings(reqs, {"a": torch.full((3, H), 2.0)}, ids,
                                       num_scheduled_tokens=counts, embed_tokens=emb)
            assert torch.equal(got, want)
