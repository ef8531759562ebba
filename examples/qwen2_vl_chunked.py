"""A tiny random-initialised Qwen2-VL (its real vision tower from ``transformers``, no
weights downloaded) prefilled in chunks through a resident ``Assembler``, every chunk
checked against the model's own merge: the tower's output scattered over the image
placeholders of the whole prompt (``inputs_embeds.masked_scatter``), then cut to the chunk.

    python examples/qwen2_vl_chunked.py        (needs the ``models`` extra: transformers)
"""

import torch
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from mmassembler import Assembler, EmbeddingCache, Item

MERGE, PATCH, TEMPORAL, HIDDEN, VOCAB, IMAGE_TOKEN = 2, 4, 2, 24, 64, 63


def main() -> None:
    torch.manual_seed(0)
    cfg = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=HIDDEN, num_heads=2, patch_size=PATCH,
                              spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    cfg._attn_implementation = "eager"
    visual = Qwen2VisionTransformerPretrainedModel._from_config(cfg).eval()
    embed_tokens = torch.nn.Embedding(VOCAB, HIDDEN)

    # two prompts: text, images (their grids set their placeholder counts), text
    grids = [[(1, 4, 6), (1, 2, 2)], [(2, 4, 4), (1, 6, 4)]]
    dim = 3 * TEMPORAL * PATCH * PATCH
    prompts = []
    for r, request_grids in enumerate(grids):
        ids, images, pos = [], [], 0
        for k, g in enumerate(request_grids):
            text = torch.randint(0, IMAGE_TOKEN, (5,)).tolist()
            ids += text
            pos += len(text)
            grid = torch.tensor([g])
            rows = int(grid.prod()) // MERGE ** 2
            pixels = torch.randn(int(grid.prod()), dim)
            images.append(Item(key=(r, k), spans=[(pos, pos + rows - 1)], data=(pixels, grid)))
            ids += [IMAGE_TOKEN] * rows
            pos += rows
        ids += torch.randint(0, IMAGE_TOKEN, (7,)).tolist()
        prompts.append((torch.tensor(ids), images))

    seen = {}  # each image's rows as the tower returned them (batches of other shapes round differently)

    def encode(items):  # one tower call over every image of the step, split by each grid
        pixels = torch.cat([it.data[0] for it in items])
        grid = torch.cat([it.data[1] for it in items])
        with torch.no_grad():
            out = visual(pixels, grid_thw=grid).pooler_output
        rows = [int(it.data[1].prod()) // MERGE ** 2 for it in items]
        seen.update(zip([it.key for it in items], torch.split(out, rows)))
        return out, rows

    def model_merge(ids, images):  # what the model does with a whole prompt and its images' rows
        with torch.no_grad():
            feats = torch.cat([seen[it.key] for it in images])
            return embed_tokens(ids).masked_scatter((ids == IMAGE_TOKEN)[:, None], feats)

    asm = Assembler(weight=embed_tokens.weight, max_tokens=64, max_requests=2, encoders={"image": encode},
                    cache=EmbeddingCache(1 << 24))
    handles = asm.add_requests([(images, len(ids)) for ids, images in prompts])
    done, chunk, step, chunks = [0, 0], 8, 0, []
    with torch.no_grad():
        while any(d < len(ids) for d, (ids, _) in zip(done, prompts)):
            live = [r for r in range(2) if done[r] < len(prompts[r][0])]
            ext = [min(chunk, len(prompts[r][0]) - done[r]) for r in live]
            ids = torch.cat([prompts[r][0][done[r]:done[r] + n] for r, n in zip(live, ext)])
            got = asm.assemble([handles[r] for r in live], [done[r] for r in live], ext, ids)
            row = 0
            for r, n in zip(live, ext):
                chunks.append((step, r, done[r], got[row:row + n]))
                done[r] += n
                row += n
            step += 1
    asm.remove_requests(handles)
    want = [model_merge(*prompt) for prompt in prompts]  # with the rows the tower gave each image
    for step, r, start, rows in chunks:
        assert torch.equal(rows, want[r][start:start + len(rows)]), f"chunk {step} of prompt {r}"
    print(f"{len(chunks)} chunks over {step} steps match Qwen2-VL's own merge; "
          f"{asm.stats()['encoder_calls']} tower calls")


if __name__ == "__main__":
    main()
