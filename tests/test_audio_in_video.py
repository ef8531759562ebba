"""Items whose spans overlap while their masks split the positions (Qwen-Omni's audio in
video: one placeholder range, video and audio rows alternating): each item's rows go to its
own masked positions, on the resident and the stateless path alike; positions two items
would both fill are a ``SpanError``."""

import pytest
import torch

from mmassembler import Assembler, Item, Request, SpanError, assemble, assemble_oracle

H = 4


def _items(video_mask):
    audio_mask = [not m for m in video_mask]
    video = Item("v", [(2, 2 + len(video_mask) - 1)], modality="video", embed_mask=video_mask,
                 embedding=torch.randn(sum(video_mask), H))
    audio = Item("a", [(2, 2 + len(video_mask) - 1)], modality="audio", embed_mask=audio_mask,
                 embedding=torch.randn(sum(audio_mask), H))
    return [video, audio]


@pytest.mark.parametrize("video_mask", [[True, True, False, False, True, True, False, False],
                                        [True, False, True, False, True, False, True, True]])
def test_each_item_takes_its_own_masked_positions_in_every_window(video_mask):
    items = _items(video_mask)
    prompt = len(video_mask) + 4
    weight = torch.randn(10, H)
    asm = Assembler(weight=weight, max_tokens=prompt, max_requests=1)
    h = asm.add_request(items, prompt)
    for p in range(prompt):
        for n in range(prompt - p + 1):
            ids = torch.randint(0, 10, (n,))
            want, _ = assemble_oracle([Request(items, p, n)], ids, lambda it: it.embedding, weight=weight)
            assert torch.equal(assemble([Request(items, p, n)], ids, weight=weight), want)
            assert torch.equal(asm.assemble([h], [p], [n], ids), want)
    video, audio = items
    rows = asm.assemble([h], [0], [prompt], torch.zeros(prompt, dtype=torch.long))
    vpos = [2 + i for i, m in enumerate(video_mask) if m]
    apos = [2 + i for i, m in enumerate(video_mask) if not m]
    assert torch.equal(rows[vpos], video.embedding) and torch.equal(rows[apos], audio.embedding)


def test_positions_claimed_by_two_items_are_an_error():
    video = Item("v", [(2, 5)], embed_mask=[True, True, False, True], embedding=torch.randn(3, H))
    audio = Item("a", [(2, 5)], embed_mask=[False, False, True, True], embedding=torch.randn(2, H))
    asm = Assembler(hidden=H, dtype=torch.float32, device="cpu", max_tokens=8, max_requests=1)
    with pytest.raises(SpanError, match="overlap"):
        asm.add_request([video, audio], 8)
    with pytest.raises(SpanError, match="overlap"):
        assemble([Request([video, audio], 0, 8)], None, out=torch.zeros(8, H))
    plain = Item("p", [(4, 6)], embedding=torch.randn(3, H))  # no mask: its whole span is its own
    with pytest.raises(SpanError, match="overlap"):
        asm.add_request([video, plain], 8)
