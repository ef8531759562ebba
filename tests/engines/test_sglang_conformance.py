"""Our SGLang adapter against SGLang 0.5.23's own ``embed_mm_inputs`` and ``prepare_mm_inputs``.

Random chunked batches built from the engine's real ``MultimodalDataItem`` and
``MultimodalInputs``: text-only and multimodal requests mixed, images, multi-span video and
audio, precomputed items, list / ``[items, rows, hidden]`` / concatenated encoders,
deepstack, a plain, a scaled (Gemma3) and a tensor-parallel text embedding. Wherever the
engine accepts the batch, our output equals its output bit for bit.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

from stand_ins import ScaledEmbedding, TensorParallelEmbedding

from mmassembler.engines import sglang as ours

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODALITIES = ("IMAGE", "VIDEO", "AUDIO")


def make_embedding(kind, vocab, hidden, dtype):
    if kind == "plain":
        return nn.Embedding(vocab, hidden).to(dtype)
    if kind == "scaled":
        return ScaledEmbedding(vocab, hidden).to(dtype)
    return TensorParallelEmbedding(vocab, hidden, dtype)


@st.composite
def scenarios(draw, *, max_requests=5, max_items=3):
    """Requests as plain data: per request a prompt, a window and items (modality, inclusive
    spans in item order, rows). Same-modality items never interleave (see the known
    differences: there the engine places rows by item order, we by position)."""
    hidden = draw(st.integers(1, 64))
    deepstack = draw(st.integers(0, 2)) if draw(st.booleans()) else 0
    requests = []
    for _ in range(draw(st.integers(1, max_requests))):
        pos = draw(st.integers(0, 3))
        items = []
        for _ in range(draw(st.integers(0, max_items))):
            modality = draw(st.sampled_from(MODALITIES))
            spans = []
            for _ in range(draw(st.integers(1, 3))):
                length = draw(st.integers(1, 6))
                spans.append((pos, pos + length - 1))
                pos += length + draw(st.integers(0, 3))
            items.append((modality, spans))
        prompt = pos + draw(st.integers(0, 3))
        prefix = draw(st.integers(0, prompt))
        extend = draw(st.integers(0, prompt - prefix))
        requests.append(dict(items=items, prompt=prompt, prefix=prefix, extend=extend))
    return dict(hidden=hidden, deepstack=deepstack, requests=requests,
                vocab=draw(st.integers(1, 40)), dtype=draw(st.sampled_from(DTYPES)),
                src_dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**31 - 1)))


def build(sg, sc, *, precomputed):
    """The engine's objects for a scenario, plus the batch's ``input_ids`` with each item's
    pad value at its placeholders (the engine finds rows by pad value; we by offsets)."""
    gen = torch.Generator().manual_seed(sc["seed"])
    hidden, k = sc["hidden"], sc["deepstack"]
    mm_inputs, ids, key = [], [], 1000
    for req in sc["requests"]:
        prompt_ids = torch.randint(0, sc["vocab"], (req["prompt"],), generator=gen)
        items = []
        for modality, spans in req["items"]:
            rows = sum(e - s + 1 for s, e in spans)
            width = hidden * (1 + k) if k and modality == "IMAGE" else hidden
            emb = (torch.randn(rows, width, generator=gen) * 3).to(sc["src_dtype"])
            key += 1
            item = sg.MultimodalDataItem(modality=sg.Modality[modality], offsets=list(spans),
                                         feature=emb, precomputed_embeddings=emb if precomputed else None)
            item.set_hash(key * 7919)
            for s, e in spans:
                prompt_ids[s: e + 1] = item.pad_value
            items.append(item)
        mm_inputs.append(sg.MultimodalInputs(mm_items=items) if items else None)
        ids.append(prompt_ids[req["prefix"]: req["prefix"] + req["extend"]])
    return mm_inputs, torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)


def encoder(kind, calls):
    """An SGLang data-embedding function over items (reads ``item.feature``)."""
    def encode(items):
        calls.append(len(items))
        rows = [it.feature for it in items]
        if kind == "list":
            return rows
        if kind == "stacked" and len({r.shape for r in rows}) == 1:
            return torch.stack(rows)
        return torch.cat(rows)
    return encode


class DeepstackModel:
    """What the engine reads off the multimodal model for deepstack (Qwen3-VL's split)."""

    def __init__(self, hidden, k):
        self.hidden, self.deepstack_visual_indexes = hidden, list(range(k))

    def separate_deepstack_embeds(self, embedding):
        return embedding[:, : self.hidden], embedding[:, self.hidden:]


def run_both(sg, sc, *, precomputed, enc_kind, emb_kind, mixed_entry):
    """(engine output, ours, engine encoder calls, our encoder calls)."""
    event(f"{'precomputed' if precomputed else enc_kind + ' encoder'}, {emb_kind} embedding"
          f"{', deepstack' if sc['deepstack'] else ''}")
    kinds = {m for r in sc["requests"] for m, spans in r["items"] for _ in spans[1:]}
    event("multi-span items: " + (", ".join(sorted(kinds)) if kinds else "none"))
    event("text-only requests" if any(not r["items"] for r in sc["requests"]) else "all multimodal")
    mm_inputs, ids = build(sg, sc, precomputed=precomputed)
    embed = make_embedding(emb_kind, sc["vocab"], sc["hidden"], sc["dtype"])
    k = sc["deepstack"]
    model = DeepstackModel(sc["hidden"], k)
    use_deepstack = {sg.Modality.IMAGE: True} if k else {}
    prefix = [r["prefix"] for r in sc["requests"]]
    extend = [r["extend"] for r in sc["requests"]]
    got = {}
    for who in ("engine", "ours"):
        calls = []
        mapping = {sg.Modality[m]: encoder(enc_kind, calls) for m in MODALITIES}
        rows_fn = (lambda it: it.feature.shape[0]) if enc_kind != "list" else None
        extra = {} if who == "engine" else dict(rows_fn=rows_fn, cache=ours.EmbeddingCache(1 << 24))
        sg.mm_schedule.init_mm_embedding_cache(1 << 24)
        with torch.no_grad():
            if mixed_entry:
                forward_batch = SimpleNamespace(
                    forward_mode=SimpleNamespace(is_decode=lambda: False, is_target_verify=lambda: False),
                    contains_mm_inputs=lambda: any(m is not None for m in mm_inputs),
                    mm_inputs=list(mm_inputs), extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=extend,
                    spec_algorithm=None, input_embeds=None)
                lm = SimpleNamespace(get_input_embeddings=lambda: embed)
                kwargs = {}
                fn = sg.mm_utils.prepare_mm_inputs if who == "engine" else ours.prepare_mm_inputs
                out = fn(ids.clone(), forward_batch, lm, kwargs, model, mapping, None, use_deepstack,
                         **({} if who == "engine" else extra))
                got[who] = (out, kwargs.get("input_deepstack_embeds"), calls)
            else:
                mm = [m for m in mm_inputs if m is not None]
                pl = [p for p, m in zip(prefix, mm_inputs) if m is not None]
                el = [e for e, m in zip(extend, mm_inputs) if m is not None]
                fn = sg.mm_utils.embed_mm_inputs if who == "engine" else ours.embed_mm_inputs
                out, other = fn(mm, pl, el, ids.clone(), embed, model, mapping, None, use_deepstack, **extra)
                got[who] = (out, other.get("input_deepstack_embeds"), calls)
    return got["engine"], got["ours"]


def assert_same(engine, mine):
    e_out, e_ds, _ = engine
    o_out, o_ds, _ = mine
    assert o_out.dtype == e_out.dtype and torch.equal(o_out, e_out)
    assert (e_ds is None) == (o_ds is None)
    if e_ds is not None:
        assert torch.equal(o_ds, e_ds)


def _all_multimodal(sc):
    return all(r["items"] for r in sc["requests"])


@settings(max_examples=400)
@given(sc=scenarios().filter(_all_multimodal), precomputed=st.booleans(),
       enc_kind=st.sampled_from(["list", "stacked", "concat"]),
       emb_kind=st.sampled_from(["plain", "scaled", "tensor_parallel"]))
def test_embed_mm_inputs_matches_engine(sg, sc, precomputed, enc_kind, emb_kind):
    engine, mine = run_both(sg, sc, precomputed=precomputed, enc_kind=enc_kind, emb_kind=emb_kind,
                            mixed_entry=False)
    assert_same(engine, mine)


@settings(max_examples=400)
@given(sc=scenarios(), precomputed=st.booleans(), enc_kind=st.sampled_from(["list", "concat"]),
       emb_kind=st.sampled_from(["plain", "scaled", "tensor_parallel"]))
def test_prepare_mm_inputs_mixed_batches_match_engine(sg, sc, precomputed, enc_kind, emb_kind):
    """Text-only requests beside multimodal ones: the whole batch's ids, the engine's
    ``forward_batch`` (``mm_inputs`` with ``None`` for text-only requests)."""
    engine, mine = run_both(sg, sc, precomputed=precomputed, enc_kind=enc_kind, emb_kind=emb_kind,
                            mixed_entry=True)
    assert_same(engine, mine)
