"""The README's integration guides, run as written against the engines' real classes:
each snippet's result equals what the engine's own code gives on the same batch."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from stand_ins import ScaledEmbedding
from torch import nn

from mmassembler.testing.engine_code import VllmModel, vllm_runner

README = Path(__file__).resolve().parents[2] / "README.md"


def guide(name: str) -> str:
    m = re.search(rf"<!-- guide: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no '{name}' guide"
    return m.group(1)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SGLANG_EXAMPLE = runpy.run_path(str(EXAMPLES / "sglang_guide.py"))  # its stand-ins for the engine's model
VLLM_EXAMPLE = runpy.run_path(str(EXAMPLES / "vllm_guide.py"))  # and the runner's state
LanguageModel, _forward_batch = SGLANG_EXAMPLE["LanguageModel"], SGLANG_EXAMPLE["forward_batch"]


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

    specs = VLLM_EXAMPLE["SPECS"]
    requests, cache, counts, ids = VLLM_EXAMPLE["runner_state"](vl, specs, vocab, h, gen)
    runner = vllm_runner([requests[s[0]] for s in specs], cache, input_ids=SimpleNamespace(gpu=ids),
                         model=model)
    sched = SimpleNamespace(total_num_scheduled_tokens=len(ids), num_scheduled_tokens=counts)
    with torch.no_grad():
        mm_embeds, is_mm = vl.gather_mm_embeddings(runner, sched)
        want = runner.model.embed_input_ids(ids, multimodal_embeddings=mm_embeds, is_multimodal=is_mm)
        scope = dict(self=runner, scheduler_output=sched, num_scheduled_tokens=len(ids))
        exec(guide("vllm"), scope)
    assert torch.equal(scope["inputs_embeds"], want)


def test_plugin_guide(sg, vl):
    """The Python form of the plugin: after ``apply()`` the engines' own names are ours,
    after ``unapply()`` every original is back."""
    code = guide("plugin")
    head, tail = code.split("# ... build and run the engine", 1)
    before = (sg.mm_utils.general_mm_embed_routine, vl.runner.GPUModelRunner.__dict__["_gather_mm_embeddings"],
              vl.utils._merge_multimodal_embeddings)
    scope = {"__name__": "readme_plugin"}
    try:
        exec(compile(head, "README.md:plugin", "exec"), scope)
        now = (sg.mm_utils.general_mm_embed_routine, vl.runner.GPUModelRunner.__dict__["_gather_mm_embeddings"],
               vl.utils._merge_multimodal_embeddings)
        assert all(a is not b for a, b in zip(now, before))
    finally:
        exec(compile("#" + tail, "README.md:plugin", "exec"), scope)
    assert (sg.mm_utils.general_mm_embed_routine, vl.runner.GPUModelRunner.__dict__["_gather_mm_embeddings"],
            vl.utils._merge_multimodal_embeddings) == before
