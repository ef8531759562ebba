"""What the adapters keep alive: engine objects, weights and Assemblers die after the engine
drops them, and a long serving loop through each adapter stays flat in heap and tensors."""

import gc
import tracemalloc
import weakref

import pytest
import torch
from stand_ins import Feature, Modality, PlaceholderRange, RunnerRequest, SgInputs, SgItem
from torch import nn

from mmassembler import BatchShapeError, EmbeddingCache
from mmassembler.engines import gather_mm_embeddings, sglang
from mmassembler.engines._resident import _by_module

H = 8


def _sg_request(key, emb=True):
    return SgInputs([SgItem(Modality.IMAGE, key, [(1, 3)], precomputed_embeddings=torch.randn(3, H) if emb else None,
                            feature=torch.randn(3, H))])


class _Model:
    def get_image_feature(self, items):
        return [it.feature for it in items]


def test_dropped_sglang_items_and_their_features_die():
    """the adapter kept every MultimodalDataItem it had seen."""
    embed = nn.Embedding(10, H)
    ids = torch.zeros(6, dtype=torch.long)
    refs = []
    with torch.no_grad():
        for k in range(20):
            m = _sg_request(1000 + k, emb=k % 2 == 0)
            refs += [weakref.ref(m), weakref.ref(m.mm_items[0]), weakref.ref(m.mm_items[0].feature)]
            sglang.embed_mm_inputs([m], [0], [6], ids, embed, _Model())
            del m
        sglang.embed_mm_inputs([_sg_request(1)], [0], [6], ids, embed, _Model())  # removes the dropped ones
    gc.collect()
    assert [r for r in refs if r() is not None] == []


def test_a_bare_weight_table_and_its_assembler_die_with_the_model():
    """bare weight tables were held strongly (the last two)."""
    weight = torch.randn(10, H)
    ids = torch.zeros(6, dtype=torch.long)
    req = RunnerRequest(0, 6, [Feature("a", PlaceholderRange(1, 3))])
    req.req_id = "r"
    gather_mm_embeddings([req], {"a": torch.randn(3, H)}, ids, embed_tokens=weight)
    table = _by_module.get(weight)
    asm_ref = weakref.ref(next(iter(table.values())).asm)
    w_ref = weakref.ref(weight)
    del weight, table, req
    gc.collect()
    assert w_ref() is None and asm_ref() is None


def test_the_same_engine_request_twice_in_one_batch_is_refused_before_registering():
    """SGLang's code accepts it; ours raised 'appears twice' a step later."""
    embed = nn.Embedding(10, H)
    m = _sg_request(7)
    ids = torch.zeros(12, dtype=torch.long)
    res_before = len(_by_module)
    with pytest.raises(BatchShapeError, match="twice"), torch.no_grad():
        sglang.embed_mm_inputs([m, m], [0, 0], [6, 6], ids, embed)
    with torch.no_grad():  # nothing registered: the request works alone afterwards
        got, _ = sglang.embed_mm_inputs([m], [0], [6], ids[:6], embed)
    assert torch.equal(got[1:4], m.mm_items[0].precomputed_embeddings)
    assert len(_by_module) >= res_before


def _tensor_bytes() -> int:
    return sum(t.untyped_storage().nbytes() for t in gc.get_objects()
               if isinstance(t, torch.Tensor) and t.device.type == "cpu")


@pytest.mark.parametrize("adapter", ["sglang", "vllm"])
def test_two_thousand_serving_steps_stay_flat(adapter):
    """New engine requests every step, each read once and dropped; heap
    and tensor bytes after 2,000 steps stay what they were after the first 200."""
    embed = nn.Embedding(10, H)
    ids = torch.zeros(6, dtype=torch.long)
    model = _Model()
    cache = EmbeddingCache(4 << 10)  # a small budget: the cache itself stays bounded

    def step(k):
        if adapter == "sglang":
            sglang.embed_mm_inputs([_sg_request(k, emb=k % 3 == 0)], [0], [6], ids, embed, model, cache=cache)
        else:
            req = RunnerRequest(0, 6, [Feature(f"f{k}", PlaceholderRange(1, 3))])
            req.req_id = f"r{k}"
            gather_mm_embeddings([req], {f"f{k}": torch.randn(3, H)}, ids, embed_tokens=embed)

    with torch.no_grad():
        for k in range(200):
            step(k)
        gc.collect()
        tracemalloc.start()
        heap0, tensors0 = tracemalloc.get_traced_memory()[0], _tensor_bytes()
        for k in range(200, 2200):
            step(k)
        gc.collect()
        heap1, tensors1 = tracemalloc.get_traced_memory()[0], _tensor_bytes()
        tracemalloc.stop()
    # 2,000 dropped requests must not add up: allow a few steps' worth of objects
    assert heap1 - heap0 < 64 << 10, (heap0, heap1)
    assert tensors1 - tensors0 <= 200 * 3 * H * 4, (tensors0, tensors1)
