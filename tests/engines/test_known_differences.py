"""Where we differ from SGLang 0.5.23 on purpose, each case run through the engine's own
code and ours: the engine's outcome is recorded (and asserted, so the README's table
stays true), ours is a typed error raised before any write, or the right rows.

Row counts (the class of bug behind SGLang PR #26442, batched encoder output split by
placeholder counts): an encoder or a precomputed embedding whose rows differ from the
item's placeholders. Placement: items listed out of position order, and interleaved
spans of one modality, which the engine fills in item order.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_sglang_conformance import DeepstackModel
from torch import nn

from mmassembler import RowCountError
from mmassembler.engines import sglang as ours

H = 4


def _item(sg, key, spans, rows, *, modality="IMAGE", precomputed=False):
    emb = torch.arange(rows * H, dtype=torch.float32).reshape(rows, H) + 1000 * key
    it = sg.MultimodalDataItem(modality=sg.Modality[modality], offsets=list(spans), feature=emb,
                               precomputed_embeddings=emb if precomputed else None)
    it.set_hash(key)
    return it


def _ids(items, n, vocab):
    ids = torch.arange(n) % vocab
    for it in items:
        for s, e in it.offsets:
            ids[s: e + 1] = it.pad_value
    return ids


def _oracle(items, ids, embed):
    """Each item's own rows at its own positions, in position order."""
    out = embed(ids.clamp(0, embed.num_embeddings - 1)).clone()
    for it in items:
        pos = [p for s, e in it.offsets for p in range(s, e + 1)]
        out[pos] = it.feature.reshape(-1, H)[: len(pos)]
    return out


def _list_encoder(items):
    return [it.feature for it in items]


def _concat_encoder(items):
    return torch.cat([it.feature for it in items])


CASES = {
    # name: (items as (key, spans, rows, modality, precomputed), encoder, engine's outcome)
    "list encoder, one item one row long": (
        [(1, [(1, 4)], 5, "IMAGE", False)], _list_encoder, "silent: drops the extra row"),
    "list encoder, one item one row short": (
        [(1, [(1, 4)], 3, "IMAGE", False)], _list_encoder, "raises RuntimeError"),
    "concatenated encoder, rows shifted between two items (same total)": (
        [(1, [(1, 4)], 3, "IMAGE", False), (2, [(6, 8)], 4, "IMAGE", False)], _concat_encoder,
        "silent: rows shifted to the other item"),
    "concatenated encoder, one row more in total": (
        [(1, [(1, 4)], 4, "IMAGE", False), (2, [(6, 8)], 4, "IMAGE", False)], _concat_encoder,
        "raises RuntimeError"),
    "precomputed embedding, one row long": (
        [(1, [(1, 4)], 5, "IMAGE", True)], _list_encoder, "silent: drops the extra row"),
    "video, two spans, one row long": (
        [(1, [(1, 2), (5, 6)], 5, "VIDEO", False)], _list_encoder, "silent: drops the extra row"),
}

ORDER_CASES = {
    # items in list order; the engine fills positions in that order
    "items listed out of position order": ([(1, [(6, 8)], 3, "IMAGE"), (2, [(1, 3)], 3, "IMAGE")],
                                           "silent: rows of one item at the other's positions"),
    "interleaved spans of one modality": ([(1, [(1, 2), (7, 8)], 4, "VIDEO"), (2, [(4, 5)], 2, "VIDEO")],
                                          "silent: rows of one item at the other's positions"),
}


def _batch(sg, items, encode):
    """One 10-token request over ``items``: (tokens, ids, text embedding, encoder mapping),
    with the engine's embedding cache emptied."""
    n = 10
    sg.mm_schedule.init_mm_embedding_cache(1 << 20)
    return n, _ids(items, n, 7), nn.Embedding(7, H), {m: encode for m in sg.Modality}


def _engine_outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except Exception as exc:  # noqa: BLE001 - recording what the engine does
        return f"raises {type(exc).__name__}", None


@pytest.mark.parametrize("name", list(CASES))
def test_row_count_mismatch(sg, name):
    specs, encode, engine_says = CASES[name]
    items = [_item(sg, k, spans, rows, modality=m, precomputed=p) for k, spans, rows, m, p in specs]
    n, ids, embed, mapping = _batch(sg, items, encode)
    with torch.no_grad():
        status, got = _engine_outcome(sg.mm_utils.embed_mm_inputs, [sg.MultimodalInputs(mm_items=items)],
                                      [0], [n], ids.clone(), embed, None, mapping)
    if status == "ok":  # silently: the placeholders took the concatenated rows cut by their counts
        assert engine_says.startswith("silent")
        pos = [p for it in items for s, e in it.offsets for p in range(s, e + 1)]
        assert torch.equal(got[0][pos], torch.cat([it.feature for it in items])[: len(pos)])
    else:
        assert status == engine_says
    cache = ours.EmbeddingCache(1 << 20)
    rows_fn = (lambda it: it.feature.shape[0]) if encode is _concat_encoder else None
    before = cache.stats
    with torch.no_grad(), pytest.raises(RowCountError) as err:
        ours.embed_mm_inputs([sg.MultimodalInputs(mm_items=items)], [0], [n], ids.clone(), embed, None,
                             mapping, cache=cache, rows_fn=rows_fn)
    assert err.value.item_key is not None
    assert cache.stats == before and len(cache) == 0  # nothing cached from a failed step


@pytest.mark.parametrize("name", list(ORDER_CASES))
def test_placement_by_position(sg, name):
    specs, engine_says = ORDER_CASES[name]
    items = [_item(sg, k, spans, rows, modality=m) for k, spans, rows, m in specs]
    n, ids, embed, mapping = _batch(sg, items, _list_encoder)
    with torch.no_grad():
        want = _oracle(items, ids, embed)
        engine, _ = sg.mm_utils.embed_mm_inputs([sg.MultimodalInputs(mm_items=items)], [0], [n], ids.clone(),
                                                embed, None, mapping)
        mine, _ = ours.embed_mm_inputs([sg.MultimodalInputs(mm_items=items)], [0], [n], ids.clone(), embed,
                                       None, mapping, cache=None)
    assert not torch.equal(engine, want), engine_says
    assert torch.equal(mine, want)


def test_engine_objects_stay_untouched(sg):
    """Nothing of ours lands on the engine's items: ``model_specific_data`` (which SGLang's
    Transformers backend passes to ``get_image_features(**...)``) stays as it was."""
    items = [_item(sg, 1, [(1, 4)], 4), _item(sg, 2, [(6, 8)], 3, modality="AUDIO", precomputed=True)]
    ids = _ids(items, 10, 7)
    embed = nn.Embedding(7, H)
    with torch.no_grad():
        for prefix, extend in ((0, 5), (5, 5)):
            ours.embed_mm_inputs([sg.MultimodalInputs(mm_items=items)], [prefix], [extend],
                                 ids[prefix: prefix + extend].clone(), embed, None,
                                 {m: _list_encoder for m in sg.Modality}, cache=None)
    assert all(it.model_specific_data == {} for it in items)


def test_none_batch_and_deepstack_key_like_engine(sg):
    """``mm_inputs_list=None`` gives ``None``; ``use_deepstack={IMAGE: False}`` still gives
    the deepstack key (the engine reads the mapping's truth, not its values)."""
    embed = nn.Embedding(7, H)
    assert sg.mm_utils.embed_mm_inputs(None, [], [], torch.zeros(0, dtype=torch.long), embed) is None
    assert ours.embed_mm_inputs(None, [], [], torch.zeros(0, dtype=torch.long), embed) is None
    items = [_item(sg, 1, [(1, 4)], 4)]
    ids = _ids(items, 6, 7)
    model = DeepstackModel(H, 2)
    use = {sg.Modality.IMAGE: False}
    sg.mm_schedule.init_mm_embedding_cache(1 << 20)
    with torch.no_grad():
        e_out, e_other = sg.mm_utils.embed_mm_inputs([sg.MultimodalInputs(mm_items=items)], [0], [6],
                                                     ids.clone(), embed, model,
                                                     {m: _list_encoder for m in sg.Modality}, None, use)
        o_out, o_other = ours.embed_mm_inputs([sg.MultimodalInputs(mm_items=items)], [0], [6], ids.clone(),
                                              embed, model, {m: _list_encoder for m in sg.Modality}, None,
                                              use, cache=None)
    assert set(e_other) == set(o_other) == {"input_deepstack_embeds"}
    assert torch.equal(e_out, o_out) and torch.equal(e_other["input_deepstack_embeds"],
                                                     o_other["input_deepstack_embeds"])


def test_vllm_audio_in_video_needs_no_model_override(vl):
    """Qwen-Omni's ``use_audio_in_video``: a video and an audio feature share one placeholder
    range and split it by ``is_embed``. vLLM's runner ORs the masks and concatenates the
    features' rows, so the generic ``embed_input_ids`` fills the range video-first; the
    Omni models override ``embed_input_ids`` to interleave. Ours places each feature's rows
    at its own masked positions with no override."""
    from mmassembler.testing.engine_code import VllmModel, vllm_runner
    from mmassembler.engines import gather_mm_embeddings

    video_mask = torch.tensor([True, True, False, False, True, True, False, False])
    rows = {"v": torch.arange(4 * H, dtype=torch.float32).reshape(4, H) + 100,
            "a": torch.arange(4 * H, dtype=torch.float32).reshape(4, H) + 200}
    feats = [vl.MultiModalFeatureSpec(data=None, modality=m, identifier=k,
                                      mm_position=vl.PlaceholderRange(offset=2, length=8, is_embed=mask))
             for k, m, mask in (("v", "video", video_mask), ("a", "audio", ~video_mask))]
    state = vl.CachedRequestState(req_id="r", prompt_token_ids=[0] * 12, mm_features=feats, sampling_params=None,
                                  generator=None, block_ids=([],), num_computed_tokens=0, output_token_ids=[])
    ids = torch.zeros(12, dtype=torch.long)
    embed = nn.Embedding(7, H)
    want = embed(ids).detach().clone()
    want[2 + video_mask.nonzero()[:, 0]] = rows["v"]
    want[2 + (~video_mask).nonzero()[:, 0]] = rows["a"]
    sched = SimpleNamespace(total_num_scheduled_tokens=12, num_scheduled_tokens={"r": 12})
    with torch.no_grad():
        mm_embeds, is_mm = vl.gather_mm_embeddings(vllm_runner([state], rows), sched)
        engine = VllmModel(vl, embed).embed_input_ids(ids, mm_embeds, is_multimodal=is_mm)
        mine = gather_mm_embeddings([state], rows, ids, num_scheduled_tokens={"r": 12}, embed_tokens=embed)
    assert not torch.equal(engine, want)  # the generic merge: video rows first
    assert torch.equal(engine[2:6], rows["v"]) and torch.equal(engine[6:10], rows["a"])
    assert torch.equal(mine, want)
