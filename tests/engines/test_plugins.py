"""Turning mmassembler on in an unmodified engine: our entry points, as installed with the
project, run by the engines' own plugin loaders from their wheels (SGLang's
``load_plugins``, vLLM's ``load_general_plugins``).

Installed but not asked for, the plugins change nothing. With ``MMASSEMBLER_ENGINES=1``
(or our name in the engine's allowlist) the engine's own calling code runs ours: SGLang's
routine as a model file calls it (a model module imported before the plugin ran and one
imported after), vLLM's runner gather and ``embed_input_ids`` as its ``execute_model``
calls them, over multi-step schedules, bit for bit equal to the unpatched engine.
``unapply()`` restores every original; an engine whose targets are not the ones our
drop-ins were written for is refused before anything is patched.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmassembler.engines import sglang as our_sglang
from mmassembler.engines import vllm as our_vllm
from mmassembler.engines.patching import EngineVersionError

H, VOCAB = 8, 40
SG_TARGETS = ("general_mm_embed_routine", "prepare_mm_inputs", "embed_mm_inputs")


@pytest.fixture
def clean(monkeypatch, sg, vl):
    """Each test starts and ends unpatched, with the engines' loaders able to run again."""
    for var in ("MMASSEMBLER_ENGINES", "SGLANG_PLUGINS", "VLLM_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    our_sglang.unapply()
    our_vllm.unapply()
    sg.plugins._plugins_loaded = False
    vl.plugins.plugins_loaded = False
    yield
    our_sglang.unapply()
    our_vllm.unapply()
    sg.plugins._plugins_loaded = False
    vl.plugins.plugins_loaded = False


def _originals(sg, vl):
    return ({name: getattr(sg.mm_utils, name) for name in SG_TARGETS},
            vl.runner.GPUModelRunner.__dict__["_gather_mm_embeddings"],
            vl.interfaces.SupportsMultiModal.__dict__["embed_input_ids"], vl.utils._merge_multimodal_embeddings)


def _model_module(name: str):
    """A model file that did ``from sglang.srt.managers.mm_utils import general_mm_embed_routine``."""
    mod = types.ModuleType(name)
    exec("from sglang.srt.managers.mm_utils import general_mm_embed_routine", mod.__dict__)
    sys.modules[name] = mod
    return mod


def test_our_entry_points_are_installed():
    for group, name in (("sglang.srt.plugins", "sglang_plugin"), ("vllm.general_plugins", "vllm_plugin")):
        found = [ep for ep in importlib.metadata.entry_points(group=group) if ep.name == "mmassembler"]
        assert len(found) == 1 and found[0].value == f"mmassembler.engines.plugins:{name}", group


def test_installed_but_off_the_plugins_change_nothing(clean, sg, vl):
    before = _originals(sg, vl)
    sg.plugins.load_plugins()
    vl.plugins.load_general_plugins()
    assert _originals(sg, vl) == before


@pytest.mark.parametrize("switch", [("MMASSEMBLER_ENGINES", "1"), ("SGLANG_PLUGINS", "mmassembler")])
def test_sglang_runs_ours_everywhere_the_routine_is_bound_and_unapply_restores_it(clean, monkeypatch, sg, switch,
                                                                                   caplog):
    original = sg.mm_utils.general_mm_embed_routine
    early = _model_module("fake_sglang_model_early")  # imported before the plugin ran
    monkeypatch.setenv(*switch)
    with caplog.at_level(logging.INFO, logger="mmassembler"):
        sg.plugins.load_plugins()
    assert "general_mm_embed_routine replaced" in caplog.text
    late = _model_module("fake_sglang_model_late")  # imported after
    for routine in (sg.mm_utils.general_mm_embed_routine, early.general_mm_embed_routine,
                    late.general_mm_embed_routine):
        assert routine is not original and routine.__mmassembler__ is our_sglang.general_mm_embed_routine
    assert our_sglang.apply() is False  # idempotent
    _sglang_schedule_matches(sg, lambda *a, **kw: late.general_mm_embed_routine(*a, **kw), original)
    our_sglang.unapply()
    assert sg.mm_utils.general_mm_embed_routine is original and early.general_mm_embed_routine is original
    assert late.general_mm_embed_routine is original
    del sys.modules["fake_sglang_model_early"], sys.modules["fake_sglang_model_late"]


def _sglang_schedule_matches(sg, patched, original):
    """Three requests over four chunked steps, through the routine as a model calls it,
    patched against the engine's own."""
    gen = torch.Generator().manual_seed(0)
    embed = nn.Embedding(VOCAB, H)
    lm = SimpleNamespace(get_input_embeddings=lambda: embed)
    keys = iter(range(1 << 20, 1 << 21))

    def request(spans):
        items = []
        ids = torch.randint(0, VOCAB, (40,), generator=gen)
        for s, e in spans:
            item = sg.MultimodalDataItem(modality=sg.Modality.IMAGE, offsets=[(s, e)],
                                         feature=torch.randn(e - s + 1, H, generator=gen))
            item.set_hash(next(keys))
            ids[s:e + 1] = item.pad_value
            items.append(item)
        return sg.MultimodalInputs(mm_items=items), ids
    reqs = [request([(2, 9), (20, 25)]), request([(5, 30)]), request([])]
    reqs[2] = (None, reqs[2][1])
    mapping = {sg.Modality.IMAGE: lambda items: [it.feature for it in items]}
    model = SimpleNamespace()
    for step in range(4):  # chunks of 10 positions
        prefix, extend = [10 * step] * 3, [10] * 3
        ids = torch.cat([r[1][p:p + n] for r, p, n in zip(reqs, prefix, extend)])
        got = {}
        for who, fn in (("engine", original), ("ours", patched)):
            sg.mm_schedule.init_mm_embedding_cache(1 << 20)
            fb = SimpleNamespace(
                forward_mode=SimpleNamespace(is_decode=lambda: False, is_target_verify=lambda: False),
                contains_mm_inputs=lambda: True, mm_inputs=[r[0] for r in reqs], extend_prefix_lens_cpu=prefix,
                extend_seq_lens_cpu=extend, spec_algorithm=None, input_embeds=None)
            with torch.no_grad():
                got[who] = fn(ids.clone(), fb, _LM(lm), model, mapping)
        assert torch.equal(got["ours"], got["engine"]), step


class _LM:
    """What the routine calls: the embedding, and the language model on its result
    (here the identity, so the routine returns the embeddings)."""

    def __init__(self, lm):
        self.lm = lm

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def __call__(self, input_ids=None, forward_batch=None, input_embeds=None, **kwargs):
        return input_embeds


def test_an_sglang_whose_targets_differ_is_refused_before_anything_is_patched(clean, monkeypatch, sg):
    routine = sg.mm_utils.general_mm_embed_routine
    monkeypatch.setattr(sg.mm_utils, "embed_mm_inputs", lambda inputs, prefix: None)  # another signature
    with pytest.raises(EngineVersionError, match="embed_mm_inputs"):
        our_sglang.apply()
    assert sg.mm_utils.general_mm_embed_routine is routine and our_sglang.unapply() is False


# ------------------------------------------------------------------------------------------ vLLM

def _vllm_model(vl, embed):
    class Model(vl.SupportsMultiModal):  # keeps the default embed_input_ids, as most VLMs do
        _has_oov_mm_tokens = False

        def get_language_model(self):
            return SimpleNamespace(embed_input_ids=embed)
    return Model()


def _runner_step(vl, runner, sched, ids):
    """What the runner's ``execute_model`` does for a multimodal step (no prompt embeds)."""
    mm_embeds, is_mm_embed = vl.runner.GPUModelRunner._gather_mm_embeddings(runner, sched)
    return runner.model.embed_input_ids(ids, multimodal_embeddings=mm_embeds, is_multimodal=is_mm_embed)


def _vllm_schedule(vl, embed, steps=4):
    """Runner state for three requests walked in chunks of 10 positions: per step the
    runner stand-in, the scheduler output and the step's ids."""
    gen = torch.Generator().manual_seed(1)
    cache, states = {}, []
    for i, spans in enumerate([[(2, 9), (20, 25)], [(5, 30)], []]):
        feats = []
        for j, (s, e) in enumerate(spans):
            ident = f"p{i}f{j}"
            cache[ident] = torch.randn(e - s + 1, H, generator=gen)
            feats.append(vl.MultiModalFeatureSpec(data=None, modality="image", identifier=ident,
                                                  mm_position=vl.PlaceholderRange(offset=s, length=e - s + 1)))
        prompt = torch.randint(0, VOCAB, (40,), generator=gen)
        states.append(vl.CachedRequestState(req_id=f"r{i}", prompt_token_ids=prompt.tolist(), mm_features=feats,
                                            sampling_params=None, generator=None, block_ids=([],),
                                            num_computed_tokens=0, output_token_ids=[]))
    model = _vllm_model(vl, embed)
    for step in range(steps):
        for st in states:
            st.num_computed_tokens = 10 * step
        ids = torch.cat([torch.tensor(st.prompt_token_ids[10 * step:10 * step + 10]) for st in states])
        runner = SimpleNamespace(
            input_batch=SimpleNamespace(req_ids=[s.req_id for s in states]), requests={s.req_id: s for s in states},
            encoder_cache=cache, _get_encoder_output_from_cache=cache.get, is_multimodal_pruning_enabled=False,
            uses_mrope=False, enable_prompt_embeds=False, model=model,
            input_ids=SimpleNamespace(gpu=ids), max_num_tokens=64, max_num_reqs=8)
        sched = SimpleNamespace(total_num_scheduled_tokens=30, num_scheduled_tokens={s.req_id: 10 for s in states})
        yield runner, sched, ids


def test_vllm_runner_runs_ours_and_unapply_restores_it(clean, monkeypatch, vl):
    embed = nn.Embedding(VOCAB, H)
    with torch.no_grad():
        want = [_runner_step(vl, *s) for s in _vllm_schedule(vl, embed)]
    before = _originals_vllm(vl)
    monkeypatch.setenv("MMASSEMBLER_ENGINES", "1")
    vl.plugins.load_general_plugins()
    assert _originals_vllm(vl) != before
    calls = []
    real = our_vllm.gather_mm_embeddings
    monkeypatch.setattr(our_vllm, "gather_mm_embeddings", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        got = [_runner_step(vl, *s) for s in _vllm_schedule(vl, embed)]
    assert len(calls) == 4  # every step through ours
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    our_vllm.unapply()
    assert _originals_vllm(vl) == before


def test_vllm_models_that_merge_themselves_get_our_merge(clean, vl):
    our_vllm.apply()
    parts = [torch.randn(3, H), torch.randn(2, H)]
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[1, 2, 3, 5, 6]] = True
    base = torch.randn(8, H)
    got = vl.utils._merge_multimodal_embeddings(base.clone(), parts, mask)
    want = base.clone()
    want[mask] = torch.cat(parts)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="Attempted to assign"):
        vl.utils._merge_multimodal_embeddings(base.clone(), parts[:1], mask)


def _originals_vllm(vl):
    return (vl.runner.GPUModelRunner.__dict__["_gather_mm_embeddings"],
            vl.interfaces.SupportsMultiModal.__dict__["embed_input_ids"], vl.utils._merge_multimodal_embeddings)


def test_a_vllm_whose_targets_differ_is_refused_before_anything_is_patched(clean, monkeypatch, vl):
    before = _originals_vllm(vl)
    monkeypatch.setattr(vl.utils, "_merge_multimodal_embeddings", lambda a, b: a)
    with pytest.raises(EngineVersionError, match="_merge_multimodal_embeddings"):
        our_vllm.apply()
    assert vl.runner.GPUModelRunner.__dict__["_gather_mm_embeddings"] is before[0]
