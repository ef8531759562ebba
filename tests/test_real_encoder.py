"""A real VLM vision tower as the SGLang adapter's encoder: Qwen2-VL's, from ``transformers``,
built from a tiny random-initialised config (no weights downloaded). Needs the ``models``
extra; skips without it."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import (  # noqa: E402
    Qwen2VisionTransformerPretrainedModel)

from mmassembler.engines import embed_mm_inputs  # noqa: E402

MERGE, PATCH, TEMPORAL = 2, 4, 2


class Modality:
    name = "IMAGE"


@dataclass(eq=False)
class Image:
    """An SGLang-shaped item: pixel patches and their grid, as Qwen2-VL's processor makes."""

    hash: int
    offsets: list
    feature: torch.Tensor
    image_grid_thw: torch.Tensor
    modality: type = Modality
    precomputed_embeddings: None = None


@dataclass(eq=False)
class Inputs:
    mm_items: list


def tower():
    torch.manual_seed(0)
    cfg = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=24, num_heads=2, patch_size=PATCH,
                              spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    cfg._attn_implementation = "eager"
    return Qwen2VisionTransformerPretrainedModel._from_config(cfg).eval()


def test_qwen2_vl_tower_batched_across_requests_is_placed_exactly():
    visual = tower()
    calls = []

    def get_image_feature(items):  # SGLang's Qwen2-VL: one tower call over all items' pixels
        calls.append(len(items))
        pixels = torch.cat([it.feature for it in items])
        grid = torch.cat([it.image_grid_thw for it in items])
        return visual(pixels, grid_thw=grid).pooler_output

    def rows_fn(item):  # what each item yields, from its own grid
        return int(item.image_grid_thw.prod()) // MERGE ** 2

    grids = [(1, 4, 6), (1, 2, 2), (2, 4, 4), (1, 6, 4)]
    dim = 3 * TEMPORAL * PATCH * PATCH
    gen = torch.Generator().manual_seed(1)
    images, pos = [], 3
    for k, g in enumerate(grids):
        grid = torch.tensor([g])
        rows = int(grid.prod()) // MERGE ** 2
        images.append(Image(k + 1, [(pos, pos + rows - 1)], torch.randn(int(grid.prod()), dim, generator=gen),
                            grid))
        pos += rows + 2
    requests = [Inputs(images[:2]), Inputs(images[2:])]  # two requests, two images each
    prompt = [images[1].offsets[0][1] + 3, images[3].offsets[0][1] + 3]
    embed = nn.Embedding(50, 24)
    ids = torch.randint(0, 50, (sum(prompt),), generator=gen)
    with torch.no_grad():
        out, _ = embed_mm_inputs(requests, [0, 0], prompt, ids, embed,
                                 data_embedding_func_mapping={Modality: get_image_feature},
                                 rows_fn={"image": rows_fn}, cache=None)
        assert calls == [4]  # all four images of both requests in one tower call
        batched = get_image_feature(images)
        single = [get_image_feature([im]) for im in images]
        calls.clear()  # without rows_fn: one tower call per image, each placed as it came
        fresh = [Inputs(images[:2]), Inputs(images[2:])]
        per_image, _ = embed_mm_inputs(fresh, [0, 0], prompt, ids, embed,
                                       data_embedding_func_mapping={Modality: get_image_feature}, cache=None)
    assert calls == [1, 1, 1, 1]
    rows = [rows_fn(im) for im in images]
    for k, (im, part) in enumerate(zip(images, torch.split(batched, rows))):
        s, e = im.offsets[0]
        base = 0 if k < 2 else prompt[0]
        assert torch.equal(out[base + s: base + e + 1], part)  # placed exactly, split by the grid
        assert torch.equal(per_image[base + s: base + e + 1], single[k])
        # the tower's own arithmetic may differ by rounding between batch shapes, not by rows
        torch.testing.assert_close(part, single[k], rtol=1e-5, atol=1e-6)
