"""The README's integration guides, run as written against the engines' real classes:
each snippet's result equals what the engine's own code gives on the same batch."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_sglang_conformance import ScaledEmbedding
from torch import nn

from bench.engine_code import VllmModel, vllm_runner

README = Path(__file__).resolve().parents[2] / "README.md"


def guide(name: str) -> str:
    m = re.search(rf"<!-- guide: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no '{name}' guide"
    return m.group(1)


class LanguageModel(nn.Module):
    """Returns its input embeddings (and keeps the kwargs) so the routine's result shows."""

    def __init__(self, embed):
        super().__init__()
        self.embed_tokens = embed

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids, forward_batch, input_embeds, **kwargs):
        self.kwargs = kwargs
        return input_embeds


def _forward_batch(mm_inputs, prefix, extend):
    return SimpleNamespace(
        forward_mode=SimpleNamespace(is_decode=lambda: False, is_target_verify=lambda: False),
        contains_mm_inputs=lambda: any(m is not None for m in mm_inputs), mm_inputs=list(mm_inputs),
        extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=extend, spec_algorithm=None, input_embeds=None)


@pytest.mark.parametrize("embed_kind", ["plain", "scaled"])
def test_sglang_guide(sg, embed_kind):
    h, vocab = 8, 20
    gen = torch.Generator().manual_seed(1)
    embed = (nn.Embedding if embed_kind == "plain" else ScaledEmbedding)(vocab, h)
    # three requests: images (one cut by the chunk), text only, one image
    layout = [[(2, 7), (10, 13)], None, [(1, 8)]]
    windows = [(0, 12), (0, 5), (3, 7)]
    mm_inputs, ids, key = [], [], 0
    for spans, (p, n) in zip(layout, windows):
        prompt = torch.randint(0, vocab, (p + n + 4,), generator=gen)
        if spans is None:
            mm_inputs.append(None)
        else:
            items = []
            for s, e in spans:
                key += 1
                rows = e - s + 1
                it = sg.MultimodalDataItem(modality=sg.Modality.IMAGE, offsets=[(s, e)],
                                           feature=torch.randn(rows, h, generator=gen))
                it.image_grid_thw = torch.tensor([1, 2, 2 * rows])  # rows = prod // 4, as Qwen2-VL
                it.set_hash(key)
                prompt[s: e + 1] = it.pad_value
                items.append(it)
            mm_inputs.append(sg.MultimodalInputs(mm_items=items))
        ids.append(prompt[p: p + n])
    ids = torch.cat(ids)
    prefix, extend = [w[0] for w in windows], [w[1] for w in windows]

    class Qwen2VL:
        def __init__(self):
            self.model = LanguageModel(embed)

        def get_image_feature(self, items):  # one tower call, rows concatenated
            return torch.cat([it.feature for it in items])

    model = Qwen2VL()
    positions = torch.arange(len(ids))
    sg.mm_schedule.init_mm_embedding_cache(1 << 24)
    with torch.no_grad():
        want = sg.mm_utils.general_mm_embed_routine(
            input_ids=ids.clone(), forward_batch=_forward_batch(mm_inputs, prefix, extend),
            language_model=model.model, multimodal_model=model,
            data_embedding_funcs={sg.Modality.IMAGE: model.get_image_feature}, positions=positions)
        scope = dict(input_ids=ids.clone(), forward_batch=_forward_batch(mm_inputs, prefix, extend),
                     self=model, Modality=sg.Modality, positions=positions)
        exec(guide("sglang"), scope)
    assert torch.equal(scope["hidden_states"], want)
    assert model.model.kwargs.keys() == {"positions"}


def test_vllm_guide(vl):
    h, vocab = 8, 20
    gen = torch.Generator().manual_seed(2)
    model = VllmModel(vl, ScaledEmbedding(vocab, h))  # Gemma3-like text rows

    specs = [("a", [(3, 6, None), (12, 5, [True, False, True, True, True])], 4, 11),
             ("b", [], 0, 3), ("c", [(0, 9, None)], 2, 5)]
    requests, cache, counts, ids = {}, {}, {}, []
    for req_id, feats, done, n in specs:
        features = []
        prompt = torch.randint(0, vocab - 1, (40,), generator=gen)
        for j, (off, length, mask) in enumerate(feats):
            pr = vl.PlaceholderRange(offset=off, length=length,
                                     is_embed=None if mask is None else torch.tensor(mask))
            ident = f"{req_id}{j}"
            features.append(vl.MultiModalFeatureSpec(data=None, modality="image", identifier=ident,
                                                     mm_position=pr))
            cache[ident] = torch.randn(length if mask is None else sum(mask), h, generator=gen)
            prompt[off: off + length] = vocab - 1
        requests[req_id] = vl.CachedRequestState(
            req_id=req_id, prompt_token_ids=prompt.tolist(), mm_features=features, sampling_params=None,
            generator=None, block_ids=([],), num_computed_tokens=done, output_token_ids=[])
        counts[req_id] = n
        ids.append(prompt[done: done + n])
    ids = torch.cat(ids)
    runner = vllm_runner([requests[s[0]] for s in specs], cache, input_ids=SimpleNamespace(gpu=ids),
                         model=model)
    sched = SimpleNamespace(total_num_scheduled_tokens=len(ids), num_scheduled_tokens=counts)
    with torch.no_grad():
        mm_embeds, is_mm = vl.gather_mm_embeddings(runner, sched)
        want = runner.model.embed_input_ids(ids, multimodal_embeddings=mm_embeds, is_multimodal=is_mm)
        scope = dict(self=runner, scheduler_output=sched, num_scheduled_tokens=len(ids))
        exec(guide("vllm"), scope)
    assert torch.equal(scope["inputs_embeds"], want)
