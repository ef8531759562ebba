"""Natural mistakes with the adapters get a typed error that says what to pass, and the
SGLang adapter is never silent: rows functions that match no modality, a near-miss of one
of our options, and no batched encoder call made only to be thrown away."""

import pytest
import torch
from stand_ins import Feature, Modality, PlaceholderRange, RunnerRequest, SgInputs, SgItem
from torch import nn

from mmassembler import Assembler, BatchShapeError
from mmassembler.engines import embed_mm_inputs, gather_mm_embeddings, general_mm_embed_routine

H = 4


def _vllm_request(req_id="a"):
    r = RunnerRequest(0, 6, [Feature("x", PlaceholderRange(1, 2))])
    r.req_id = req_id
    return r


@pytest.mark.parametrize("mistake", ["no counts", "missing request", "the requests dict", "not a state"])
def test_vllm_mistakes_are_typed_and_say_what_to_pass(mistake):
    embed = nn.Embedding(10, H)
    ids = torch.zeros(6, dtype=torch.long)
    r = _vllm_request()
    del r.num_scheduled_tokens  # the runner's CachedRequestState carries no count
    args = dict(requests=[r], num_scheduled_tokens={"a": 6})
    if mistake == "no counts":
        args["num_scheduled_tokens"] = None
        match = "pass num_scheduled_tokens="
    elif mistake == "missing request":
        args["num_scheduled_tokens"] = {"c": 6}
        match = "no entry for request 'a'"
    elif mistake == "the requests dict":
        args["requests"] = {"a": r}
        match = r"self.requests\[r\] for r in self.input_batch.req_ids"
    else:
        args["requests"] = ["a"]
        match = "not a request state"
    with pytest.raises(BatchShapeError, match=match):
        gather_mm_embeddings(args["requests"], {"x": torch.randn(2, H)}, ids,
                             num_scheduled_tokens=args["num_scheduled_tokens"], embed_tokens=embed)


def test_sglang_rows_fn_keys_that_match_no_modality_are_refused():
    items = [SgItem(Modality.IMAGE, 1, [(0, 1)], feature=torch.randn(2, H))]
    with pytest.raises(BatchShapeError, match="match no modality"):
        embed_mm_inputs([SgInputs(items)], [0], [4], torch.zeros(4, dtype=torch.long), nn.Embedding(5, H),
                        data_embedding_func_mapping={Modality.IMAGE: lambda its: [it.feature for it in its]},
                        rows_fn={"imag": lambda it: 2}, cache=None)


@pytest.mark.parametrize("typo", ["row_fn", "caches", "backends", "max_token"])
def test_a_near_miss_of_our_options_is_named(typo):
    class LM:
        def get_input_embeddings(self):
            return nn.Embedding(5, H)

        def __call__(self, **kw):
            return kw
    with pytest.raises(BatchShapeError, match="did you mean"):
        general_mm_embed_routine(torch.zeros(2, dtype=torch.long), object(), LM(), **{typo: None})


def test_a_concatenating_encoder_without_rows_fn_is_never_called_batched_for_nothing():
    calls = []

    def tower(items):  # the Qwen family: every item's rows in one 2-D tensor
        calls.append(len(items))
        return torch.cat([it.feature for it in items])
    for step in range(2):
        items = [SgItem(Modality.IMAGE, 10 * step + k, [(3 * k, 3 * k + 1)], feature=torch.full((2, H), float(k)))
                 for k in range(3)]
        with torch.no_grad():
            out, _ = embed_mm_inputs([SgInputs(items)], [0], [9], torch.zeros(9, dtype=torch.long), nn.Embedding(5, H),
                                     data_embedding_func_mapping={Modality.IMAGE: tower}, cache=None)
        for k in range(3):
            assert torch.equal(out[3 * k:3 * k + 2], torch.full((2, H), float(k)))
    assert calls == [1, 1, 1, 1, 1, 1]  # one item per call; never a call of three thrown away


def test_an_empty_assembler_is_truthy():
    asm = Assembler(weight=torch.zeros(3, H), max_tokens=4, max_requests=1)
    assert len(asm) == 0 and bool(asm) and (asm or None) is asm
