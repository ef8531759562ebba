"""Engine-shaped fakes driving the SGLang and vLLM adapters: ≡ our reference ≡ the oracle."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stand_ins import Feature, Modality, PlaceholderRange, RunnerRequest, SgInputs, SgItem, VocabParallelEmbedding
from strategies import batches
from torch import nn

from mmassembler import RowCountError, assemble, assemble_oracle
from mmassembler.engines import (embed_input_ids, embed_mm_inputs, gather_mm_embeddings,
                                 merge_multimodal_embeddings)


def _to_sglang(batch, precomputed: bool):
    mm_inputs, ours = [], []
    for r in batch.requests:
        items = [SgItem(Modality.IMAGE if it.key % 2 else Modality.AUDIO, it.key, list(it.spans),
                        precomputed_embeddings=it.embedding if precomputed else None,
                        feature=it.embedding) for it in r.items]
        mm_inputs.append(SgInputs(items) if items else None)
        ours.append(r)
    return mm_inputs


def _list_encoder(calls):
    def encode(items):
        calls.append(len(items))
        return [it.feature for it in items]
    return encode


def _concat_encoder(calls):
    def encode(items):
        calls.append(len(items))
        return torch.cat([it.feature.reshape(-1, it.feature.shape[-1]) for it in items])
    return encode


def _no_masks(batch):
    return all(it.embed_mask is None for r in batch.requests for it in r.items)


@settings(max_examples=25)
@given(batch=batches(max_requests=5, max_items=3).filter(_no_masks), precomputed=st.booleans(),
       concatenated=st.booleans(), fused=st.booleans())
def test_sglang_adapter_matches_oracle(batch, precomputed, concatenated, fused):
    embed = (nn.Embedding if fused else VocabParallelEmbedding)(batch.vocab, batch.hidden)
    embed = embed.to(batch.out_dtype)
    calls = []
    make = _concat_encoder if concatenated else _list_encoder
    mapping = {Modality.IMAGE: make(calls), Modality.AUDIO: make(calls)}
    rows_fn = (lambda it: it.feature.shape[0]) if concatenated else None
    prefix = [r.prefix_len for r in batch.requests]
    extend = [r.extend_len for r in batch.requests]
    with torch.no_grad():
        # no cache: examples give one key other contents (an engine's hash is of the content)
        got, other = embed_mm_inputs(_to_sglang(batch, precomputed), prefix, extend, batch.input_ids,
                                     embed, data_embedding_func_mapping=mapping, rows_fn=rows_fn,
                                     cache=None)
        want, _ = assemble_oracle(batch.requests, batch.input_ids, lambda it: it.embedding,
                                  weight=embed.weight)
        ref = assemble(batch.requests, batch.input_ids, weight=embed.weight, backend="torch")
    assert torch.equal(got, want) and torch.equal(ref, want) and other == {}
    if precomputed:
        assert calls == []


def test_sglang_deepstack_goes_to_other_info():
    class Model:
        deepstack_visual_indexes = [3, 7]

        def get_image_feature(self, items):
            return [it.feature for it in items]

    h = 8
    emb = torch.randn(5, 3 * h)
    item = SgItem(Modality.IMAGE, 11, [(2, 6)], feature=emb)
    ids = torch.randint(0, 10, (9,))
    embed = nn.Embedding(10, h)
    with torch.no_grad():
        out, other = embed_mm_inputs([SgInputs([item])], [0], [9], ids, embed, Model(),
                                     use_deepstack={Modality.IMAGE: True})
    ds = other["input_deepstack_embeds"]
    assert torch.equal(out[2:7], emb[:, :h]) and torch.equal(ds[2:7], emb[:, h:])
    assert torch.equal(ds[:2], torch.zeros(2, 2 * h)) and torch.equal(out[0], embed.weight[ids[0]])


@pytest.mark.parametrize("with_rows_fn", [True, False])
def test_shifted_concatenation_is_an_error_never_a_shifted_result(with_rows_fn):
    # The encoder's true rows: item 1 one row short of its placeholders, item 2 one row
    # long -- the same total, so splitting by placeholder counts would shift silently.
    h = 4
    a = SgItem(Modality.IMAGE, 1, [(0, 4)], feature=torch.randn(4, h))   # 5 placeholders
    b = SgItem(Modality.IMAGE, 2, [(6, 10)], feature=torch.randn(6, h))  # 5 placeholders
    calls = []
    enc = _concat_encoder(calls)
    rows_fn = (lambda it: it.feature.shape[0]) if with_rows_fn else None
    with pytest.raises(RowCountError) as info, torch.no_grad():
        embed_mm_inputs([SgInputs([a, b])], [0], [12], torch.zeros(12, dtype=torch.long),
                        nn.Embedding(3, h), data_embedding_func_mapping={Modality.IMAGE: enc},
                        rows_fn=rows_fn)
    assert info.value.item_key == 1 and info.value.request == 0
    assert (info.value.expected, info.value.returned) == (5, 4)
    if with_rows_fn:
        assert calls == [2]  # one batched call, split by the encoder's own rows
    else:
        assert calls[-2:] == [1, 1]  # one item per call: each output belongs to one item


# ---------------------------------------------------------------------------------------- vLLM

def _to_vllm(batch):
    cache, reqs = {}, []
    for r in batch.requests:
        feats = []
        for it in r.items:
            (s, e), = it.spans[:1] if len(it.spans) == 1 else [(None, None)]
            if s is None:
                return None, None
            mask = None if it.embed_mask is None else torch.tensor(it.embed_mask)
            feats.append(Feature(f"h{it.key}", PlaceholderRange(s, e - s + 1, mask)))
            cache[f"h{it.key}"] = it.embedding
        reqs.append(RunnerRequest(r.prefix_len, r.extend_len, feats))
    return reqs, cache


def _single_span(batch):
    return all(len(it.spans) == 1 for r in batch.requests for it in r.items)


@settings(max_examples=25)
@given(batch=batches(max_requests=5, max_items=3).filter(_single_span), fused=st.booleans())
def test_vllm_gather_matches_oracle(batch, fused):
    reqs, cache = _to_vllm(batch)
    weight = torch.randn(batch.vocab, batch.hidden).to(batch.out_dtype)
    if fused:
        got = gather_mm_embeddings(reqs, cache, batch.input_ids, embed_tokens=weight)
        want, _ = assemble_oracle(batch.requests, batch.input_ids, lambda it: it.embedding,
                                  weight=weight)
    else:
        base = torch.randn(batch.num_tokens, batch.hidden).to(batch.out_dtype)
        want, _ = assemble_oracle(batch.requests, batch.input_ids, lambda it: it.embedding, out=base)
        got = gather_mm_embeddings(reqs, cache, batch.input_ids, out=base.clone())
    assert torch.equal(got, want)


@given(parts=st.lists(st.integers(0, 6), min_size=1, max_size=4), hidden=st.integers(1, 20),
       gaps=st.lists(st.integers(0, 3), min_size=30, max_size=30), seed=st.integers(0, 99))
def test_vllm_merge_and_embed_input_ids_match_masked_assignment(parts, hidden, gaps, seed):
    g = torch.Generator().manual_seed(seed)
    embeds = [torch.randn(n, hidden, generator=g) for n in parts]
    total = sum(parts)
    mask, i = [], 0
    while sum(mask) < total:  # True rows in runs, with text rows between them
        mask += [False] * gaps[i % len(gaps)] + [True] * (1 + gaps[(i + 7) % len(gaps)])
        i += 1
    mask = torch.tensor(mask[:len(mask) - (sum(mask) - total)] if sum(mask) > total else mask)
    n = mask.shape[0]
    weight = torch.randn(9, hidden, generator=g)
    ids = torch.randint(-2, 12, (n,), generator=g)
    want = weight[ids.clamp(0, 8)]
    if total:
        want[mask] = torch.cat(embeds)
    base = weight[ids.clamp(0, 8)]
    assert torch.equal(merge_multimodal_embeddings(base, embeds, mask), want)
    assert torch.equal(embed_input_ids(ids, embeds, is_multimodal=mask, embed_tokens=weight), want)


def test_vllm_mismatch_keeps_its_message_and_writes_nothing():
    base = torch.zeros(10, 4)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[2:8] = True
    with pytest.raises(RowCountError, match=r"Attempted to assign 3 \+ 2 = 5 multimodal tokens "
                                            r"to 6 placeholders"):
        merge_multimodal_embeddings(base, [torch.ones(3, 4), torch.ones(2, 4)], mask)
    assert torch.equal(base, torch.zeros(10, 4))


def test_vllm_request_state_is_reused_across_chunks():
    from mmassembler.engines._resident import resident_for

    emb = torch.randn(6, 4)
    feat = Feature("x", PlaceholderRange(2, 6))
    req = RunnerRequest(0, 5, [feat])
    weight = torch.randn(3, 4)
    first = gather_mm_embeddings([req], {"x": emb}, torch.zeros(5, dtype=torch.long), embed_tokens=weight)
    asm = resident_for(weight, weight, weight, 0, "auto").asm
    handles = asm.registry.live_handles()
    req.num_computed_tokens, req.num_scheduled_tokens = 5, 4
    second = gather_mm_embeddings([req], {"x": emb}, torch.zeros(4, dtype=torch.long), embed_tokens=weight)
    assert torch.equal(first[2:5], emb[:3]) and torch.equal(second[:3], emb[3:])
    assert asm.registry.live_handles() == handles and len(handles) == 1  # registered once
    assert vars(req).keys() == {"num_computed_tokens", "num_scheduled_tokens", "mm_features"}
    assert "_mmassembler_item" not in vars(feat)  # nothing of ours on the engine's objects


def test_three_d_encoder_output_is_split_on_its_item_dimension():
    h = 4
    items = [SgItem(Modality.IMAGE, k, [(5 * k, 5 * k + 2)]) for k in range(3)]
    stacked = torch.randn(3, 3, h)
    calls = []

    def enc(batch):
        calls.append(len(batch))
        return stacked[[it.hash % 3 for it in batch]]
    with torch.no_grad():
        out, _ = embed_mm_inputs([SgInputs(items)], [0], [15], torch.zeros(15, dtype=torch.long),
                                 nn.Embedding(2, h), data_embedding_func_mapping={Modality.IMAGE: enc})
        more = [SgItem(Modality.IMAGE, 3 + k, [(5 * k, 5 * k + 2)]) for k in range(3)]
        again, _ = embed_mm_inputs([SgInputs(more)], [0], [15], torch.zeros(15, dtype=torch.long),
                                   nn.Embedding(2, h), data_embedding_func_mapping={Modality.IMAGE: enc})
    assert calls == [1, 2, 3]  # the first call learns the encoder's answer on one item, then batches
    for k in range(3):
        assert torch.equal(out[5 * k:5 * k + 3], stacked[k]) and torch.equal(again[5 * k:5 * k + 3], stacked[k])
