"""The README's vLLM guide as a script: the runner's ``_gather_mm_embeddings`` +
``embed_input_ids`` replaced by our ``gather_mm_embeddings``, on vLLM 0.33.0's real
``CachedRequestState`` / ``MultiModalFeatureSpec`` / ``PlaceholderRange`` (loaded from its
wheel by ``mmassembler.testing.engine_code``; the first run downloads it), bit for bit what vLLM gives.

    python examples/vllm_guide.py        (from the repository root)
"""

from types import SimpleNamespace

import torch
from torch import nn

from mmassembler.testing.engine_code import VllmModel, load_vllm, vllm_runner
from mmassembler.engines.vllm import gather_mm_embeddings


SPECS = [("a", [(3, 6, None), (12, 5, [True, False, True, True, True])], 4, 11),
         ("b", [], 0, 3), ("c", [(0, 9, None)], 2, 5)]


def runner_state(vl, specs, vocab: int, hidden: int, gen: torch.Generator):
    """The runner's requests, encoder cache, scheduled counts and step ids for ``specs``:
    per request its features ``(offset, length, is_embed)``, tokens computed before and
    tokens this step (placeholders hold ``vocab - 1``)."""
    requests, cache, counts, ids = {}, {}, {}, []
    for req_id, feats, done, n in specs:
        features = []
        prompt = torch.randint(0, vocab - 1, (40,), generator=gen)
        for j, (off, length, mask) in enumerate(feats):
            pr = vl.PlaceholderRange(offset=off, length=length, is_embed=None if mask is None else torch.tensor(mask))
            ident = f"{req_id}{j}"
            features.append(vl.MultiModalFeatureSpec(data=None, modality="image", identifier=ident, mm_position=pr))
            cache[ident] = torch.randn(length if mask is None else sum(mask), hidden, generator=gen)
            prompt[off:off + length] = vocab - 1
        requests[req_id] = vl.CachedRequestState(
            req_id=req_id, prompt_token_ids=prompt.tolist(), mm_features=features, sampling_params=None,
            generator=None, block_ids=([],), num_computed_tokens=done, output_token_ids=[])
        counts[req_id] = n
        ids.append(prompt[done:done + n])
    return requests, cache, counts, torch.cat(ids)


def main() -> None:
    vl = load_vllm()
    hidden, vocab = 16, 50
    model = VllmModel(vl, nn.Embedding(vocab, hidden))
    specs = SPECS
    requests, cache, counts, ids = runner_state(vl, specs, vocab, hidden, torch.Generator().manual_seed(0))
    runner = vllm_runner([requests[s[0]] for s in specs], cache, input_ids=SimpleNamespace(gpu=ids), model=model)
    sched = SimpleNamespace(total_num_scheduled_tokens=len(ids), num_scheduled_tokens=counts)
    with torch.no_grad():
        mm_embeds, is_mm = vl.gather_mm_embeddings(runner, sched)
        want = model.embed_input_ids(ids, multimodal_embeddings=mm_embeds, is_multimodal=is_mm)
        got = gather_mm_embeddings(  # the README's guide, as the runner writes it
            [runner.requests[req_id] for req_id in runner.input_batch.req_ids], runner.encoder_cache,
            runner.input_ids.gpu[:len(ids)], num_scheduled_tokens=sched.num_scheduled_tokens,
            embed_tokens=runner.model.get_language_model().embed_input_ids)
    assert torch.equal(got, want)
    print(f"vLLM 0.33.0's runner gather + merge and ours agree bit for bit on {len(ids)} tokens of 3 requests")


if __name__ == "__main__":
    main()
