"""The README's SGLang guide as a script: a Qwen2-VL-shaped model's forward calls our
``general_mm_embed_routine`` instead of SGLang's, on SGLang 0.5.23's real
``MultimodalDataItem`` / ``MultimodalInputs`` (loaded from its wheel by ``mmassembler.testing.engine_code``;
the first run downloads it), and gives what SGLang's own routine gives, bit for bit.

    python examples/sglang_guide.py      (from the repository root)
"""

from types import SimpleNamespace

import torch
from torch import nn

from mmassembler.testing.engine_code import load_sglang
from mmassembler.engines.sglang import general_mm_embed_routine


class LanguageModel(nn.Module):
    def __init__(self, embed):
        super().__init__()
        self.embed_tokens = embed

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids, forward_batch, input_embeds, **kwargs):
        self.kwargs = kwargs  # what the routine passed on (positions, ...)
        return input_embeds  # the decoder would run here


class Qwen2VL(nn.Module):
    def __init__(self, embed):
        super().__init__()
        self.model = LanguageModel(embed)

    def get_image_feature(self, items):  # one vision-tower call, every item's rows concatenated
        return torch.cat([it.feature for it in items])

    def forward(self, input_ids, positions, forward_batch, Modality):
        return general_mm_embed_routine(  # the README's guide, as a model file writes it
            input_ids=input_ids, forward_batch=forward_batch, language_model=self.model,
            multimodal_model=self, data_embedding_funcs={Modality.IMAGE: self.get_image_feature},
            positions=positions,
            rows_fn={Modality.IMAGE: lambda item: int(item.image_grid_thw.prod()) // 4})


def forward_batch(mm_inputs, prefix, extend):
    return SimpleNamespace(
        forward_mode=SimpleNamespace(is_decode=lambda: False, is_target_verify=lambda: False),
        contains_mm_inputs=lambda: any(m is not None for m in mm_inputs), mm_inputs=list(mm_inputs),
        extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=extend, spec_algorithm=None, input_embeds=None)


def main() -> None:
    sg = load_sglang()
    hidden, vocab = 16, 50
    gen = torch.Generator().manual_seed(0)
    model = Qwen2VL(nn.Embedding(vocab, hidden))
    layout, windows = [[(2, 9), (12, 15)], None, [(1, 8)]], [(0, 14), (0, 6), (3, 7)]  # a chunk cuts an image
    mm_inputs, ids, key = [], [], 0
    for spans, (p, n) in zip(layout, windows):
        prompt = torch.randint(0, vocab, (p + n + 4,), generator=gen)
        items = []
        for s, e in spans or []:
            key += 1
            it = sg.MultimodalDataItem(modality=sg.Modality.IMAGE, offsets=[(s, e)],
                                       feature=torch.randn(e - s + 1, hidden, generator=gen))
            it.image_grid_thw = torch.tensor([1, 2, 2 * (e - s + 1)])
            it.set_hash(key)
            prompt[s:e + 1] = it.pad_value
            items.append(it)
        mm_inputs.append(sg.MultimodalInputs(mm_items=items) if items else None)
        ids.append(prompt[p:p + n])
    ids = torch.cat(ids)
    prefix, extend = [w[0] for w in windows], [w[1] for w in windows]
    positions = torch.arange(len(ids))
    sg.mm_schedule.init_mm_embedding_cache(1 << 24)
    with torch.no_grad():
        want = sg.mm_utils.general_mm_embed_routine(
            input_ids=ids.clone(), forward_batch=forward_batch(mm_inputs, prefix, extend),
            language_model=model.model, multimodal_model=model,
            data_embedding_funcs={sg.Modality.IMAGE: model.get_image_feature}, positions=positions)
        got = model(ids.clone(), positions, forward_batch(mm_inputs, prefix, extend), sg.Modality)
    assert torch.equal(got, want)
    print(f"SGLang 0.5.23's routine and ours agree bit for bit on {len(ids)} tokens of 3 requests")


if __name__ == "__main__":
    main()
