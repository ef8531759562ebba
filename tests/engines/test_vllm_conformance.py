"""Our vLLM adapters against vLLM 0.33.0's own code.

The engine's path for a step: the model runner's real ``_gather_mm_embeddings`` (on a
stand-in runner holding the real ``CachedRequestState``s, ``MultiModalFeatureSpec``s and
``PlaceholderRange``s it reads), then the real ``SupportsMultiModal.embed_input_ids``
(text embedding, then ``_merge_multimodal_embeddings``). Ours: one
``gather_mm_embeddings`` call from the same objects. Random chunked batches: several
requests and features, ``is_embed`` masks, windows at random cut points, the drafter's
``shift_computed_tokens`` look-ahead with features not yet encoded, plain / scaled
(Gemma3) / tensor-parallel text embeddings, deepstack (Qwen3-VL's split), several dtypes.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_sglang_conformance import DTYPES, make_embedding

from mmassembler.testing.engine_code import VllmModel, vllm_runner

from mmassembler.engines import vllm as ours


@st.composite
def steps(draw, *, max_requests=5, max_features=3):
    hidden = draw(st.integers(1, 48))
    requests = []
    for _ in range(draw(st.integers(1, max_requests))):
        pos = draw(st.integers(0, 3))
        features = []
        for _ in range(draw(st.integers(0, max_features))):
            length = draw(st.integers(1, 8))
            mask = [draw(st.booleans()) for _ in range(length)] if draw(st.integers(0, 2)) == 0 else None
            features.append(dict(offset=pos, length=length, is_embed=mask,
                                 encoded=draw(st.integers(0, 4)) > 0,
                                 modality=draw(st.sampled_from(["image", "video", "audio"]))))
            pos += length + draw(st.integers(0, 3))
        prompt = pos + draw(st.integers(1, 3))
        done = draw(st.integers(0, prompt - 1))
        n = draw(st.integers(1, prompt - done))  # the scheduler never schedules 0 tokens
        requests.append(dict(features=features, prompt=prompt, done=done, n=n))
    return dict(hidden=hidden, requests=requests, vocab=draw(st.integers(1, 40)),
                dtype=draw(st.sampled_from(DTYPES)), src_dtype=draw(st.sampled_from(DTYPES)),
                shift=draw(st.sampled_from([0, 0, 1, 2])), levels=draw(st.sampled_from([0, 0, 1, 2])),
                seed=draw(st.integers(0, 2**31 - 1)))


def build(vl, sc):
    """Real runner state: ``CachedRequestState``s, the encoder cache, the scheduler's counts
    and the batch's ids (placeholders are the vocabulary's last token: the drafter's look-ahead
    falls back to their token embeddings)."""
    gen = torch.Generator().manual_seed(sc["seed"])
    width = sc["hidden"] * (1 + sc["levels"])
    states, cache, ids, counts = [], {}, [], {}
    for i, req in enumerate(sc["requests"]):
        prompt = torch.randint(0, sc["vocab"], (req["prompt"],), generator=gen)
        features = []
        for j, f in enumerate(req["features"]):
            mask = None if f["is_embed"] is None else torch.tensor(f["is_embed"])
            pr = vl.PlaceholderRange(offset=f["offset"], length=f["length"], is_embed=mask)
            ident = f"r{i}f{j}"
            features.append(vl.MultiModalFeatureSpec(data=None, modality=f["modality"], identifier=ident,
                                                     mm_position=pr))
            rows = f["length"] if mask is None else int(mask.sum())
            # the scheduler encodes what this step's tokens reach; only the drafter's
            # look-ahead can reach a feature that is not encoded yet
            if f["encoded"] or f["offset"] < req["done"] + req["n"]:
                cache[ident] = (torch.randn(rows, width, generator=gen) * 3).to(sc["src_dtype"])
            span = prompt[f["offset"]: f["offset"] + f["length"]]  # is_embed False: a text token
            span[torch.ones(f["length"], dtype=torch.bool) if mask is None else mask] = sc["vocab"] - 1
        state = vl.CachedRequestState(req_id=f"req{i}", prompt_token_ids=prompt.tolist(),
                                      mm_features=features, sampling_params=None, generator=None,
                                      block_ids=([],), num_computed_tokens=req["done"], output_token_ids=[])
        states.append(state)
        counts[state.req_id] = req["n"]
        lo = req["done"] + sc["shift"]
        window = prompt[lo: lo + req["n"]]
        ids.append(torch.cat([window, torch.zeros(req["n"] - len(window), dtype=window.dtype)]))
    return states, cache, counts, torch.cat(ids)


def engine_step(vl, sc, states, cache, counts, ids, embed):
    """The runner's gather, then the model's embed_input_ids (Qwen3-VL's deepstack split
    through the real merge when ``levels``)."""
    runner = vllm_runner(states, cache)
    sched = SimpleNamespace(total_num_scheduled_tokens=int(ids.shape[0]), num_scheduled_tokens=counts)
    mm_embeds, is_mm = vl.gather_mm_embeddings(runner, sched, sc["shift"])
    hidden, levels = sc["hidden"], sc["levels"]
    deepstack = None
    if levels and mm_embeds:
        text = embed(ids.masked_fill(is_mm, 0))
        deepstack = vl.merge(text.new_zeros(text.shape[0], levels * hidden),
                             [e[:, hidden:] for e in mm_embeds], is_mm)
        mm_embeds = [e[:, :hidden] for e in mm_embeds]
    out = VllmModel(vl, embed).embed_input_ids(ids, mm_embeds, is_multimodal=is_mm)
    return out, deepstack


@settings(max_examples=600)
@given(sc=steps(), emb_kind=st.sampled_from(["plain", "scaled", "tensor_parallel"]))
def test_gather_and_embed_match_engine(vl, sc, emb_kind):
    event(f"{emb_kind} embedding, shift {sc['shift']}, deepstack levels {sc['levels']}")
    if any(f["is_embed"] is not None for r in sc["requests"] for f in r["features"]):
        event("is_embed masks")
    states, cache, counts, ids = build(vl, sc)
    embed = make_embedding(emb_kind, sc["vocab"], sc["hidden"], sc["dtype"])
    with torch.no_grad():
        want, want_ds = engine_step(vl, sc, states, cache, counts, ids, embed)
        ds = torch.zeros(ids.shape[0], sc["levels"] * sc["hidden"], dtype=sc["dtype"]) if sc["levels"] else None
        got = ours.gather_mm_embeddings(states, cache, ids, num_scheduled_tokens=counts,
                                        shift_computed_tokens=sc["shift"], embed_tokens=embed,
                                        deepstack_out=ds)
    assert got.dtype == want.dtype and torch.equal(got, want)
    if want_ds is not None:
        assert torch.equal(ds, want_ds)
    elif ds is not None:
        assert not ds.any()
