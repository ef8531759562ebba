"""Multi-step lifecycles through each adapter, against the engine's own code at every step.

Hypothesis drives a small serving engine: requests are admitted (sometimes under the id of
one that finished), prefilled in chunks under a token budget, finished, aborted mid-prompt,
preempted and recomputed from token 0 under the same ``req_id`` (vLLM: a new
``CachedRequestState``), retracted (SGLang: the same ``MultimodalInputs``, its prefill
started again), and the encoder cache drops an entry between two chunks of the request that
reads it (vLLM: the entry is encoded again, a new tensor; SGLang: both embedding caches
cleared). Every step's output equals the engine's real functions' (SGLang 0.5.23, vLLM 0.33.0,
from their wheels) bit for bit; once the engine has dropped every request, the adapter holds
no request and no source.

``LIFECYCLE_EXAMPLES`` sets the number of schedules (CI: a few; a long run: thousands).
"""

from __future__ import annotations

import gc
import itertools
import os
from types import SimpleNamespace

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_vllm_conformance import engine_step
from torch import nn

from mmassembler.engines import sglang as our_sglang
from mmassembler.engines import vllm as our_vllm
from mmassembler.engines._resident import resident_for

EXAMPLES = int(os.environ.get("LIFECYCLE_EXAMPLES", "8"))
STEPS = int(os.environ.get("LIFECYCLE_STEPS", "10"))
H, VOCAB = 8, 50
_ids = itertools.count(1)
_steps_run = {"vllm": 0, "sglang": 0}  # steps checked, for the long run's report


def _request(data, gen):
    """A prompt and its features: ``(prompt ids, [(offset, length, embedding)])``."""
    pos, feats = data.draw(st.integers(0, 3)), []
    for _ in range(data.draw(st.integers(0, 3))):
        length = data.draw(st.integers(1, 6))
        feats.append((pos, length, torch.randn(length, H, generator=gen) * 3))
        pos += length + data.draw(st.integers(0, 4))
    prompt = pos + data.draw(st.integers(1, 4))
    return torch.randint(0, VOCAB - 1, (prompt,), generator=gen), feats


class Engine:
    """The engine's side of a lifecycle: live requests with their computed tokens."""

    def __init__(self, data, gen, budget):
        self.data, self.gen, self.budget = data, gen, budget
        self.live: list = []  # dicts: rid, prompt, feats, done, obj
        self.finished_rids: list = []

    def admit(self, make_obj):
        data = self.data
        for _ in range(data.draw(st.integers(0, 2))):
            reuse = self.finished_rids and data.draw(st.booleans())
            rid = self.finished_rids.pop() if reuse else f"req{next(_ids)}"
            prompt, feats = _request(data, self.gen)
            r = dict(rid=rid, prompt=prompt, feats=feats, done=0)
            r["obj"] = make_obj(r)
            self.live.append(r)

    def schedule(self):
        """This step's windows ``(request, prefix, extend)``: running requests in order,
        each a chunk of what the budget leaves."""
        left, windows = self.budget, []
        for r in self.live:
            if left <= 0:
                break
            rest = r["prompt"].shape[0] - r["done"]
            n = min(rest, left, self.data.draw(st.integers(1, rest)))
            windows.append((r, r["done"], n))
            left -= n
        return windows


def _step_ids(windows, pad=None):
    parts = []
    for r, p, n in windows:
        ids = r["prompt"].clone()
        if pad is not None:
            for (off, length, _), value in zip(r["feats"], pad(r)):
                ids[off:off + length] = value
        parts.append(ids[p:p + n])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _advance(engine, windows, drop):
    for r, p, n in windows:
        r["done"] = p + n
    for r in [r for r, _, _ in windows if r["done"] == r["prompt"].shape[0]]:
        drop(r)
        engine.live.remove(r)
        engine.finished_rids.append(r["rid"])


def _nothing_held(resident):
    """After the engine dropped every request (and a step ran): no request, no source."""
    reg = resident.asm.registry
    texts = set(resident._text)
    assert set(reg.live_handles()) <= texts, reg.live_handles()
    assert reg.held_sources() == []


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_vllm_lifecycle_matches_the_runner_every_step(vl, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    embed = nn.Embedding(VOCAB, H)
    engine = Engine(data, gen, data.draw(st.sampled_from([6, 12, 40])))
    cache: dict = {}  # the runner's encoder cache: identifier -> encoder output

    def make_obj(r):
        feats = []
        for j, (off, length, emb) in enumerate(r["feats"]):
            ident = f"{r['rid']}-{next(_ids)}-{j}"
            cache[ident] = emb.clone()
            feats.append(vl.MultiModalFeatureSpec(data=None, modality="image", identifier=ident,
                                                  mm_position=vl.PlaceholderRange(offset=off, length=length)))
        return vl.CachedRequestState(req_id=r["rid"], prompt_token_ids=r["prompt"].tolist(), mm_features=feats,
                                     sampling_params=None, generator=None, block_ids=([],), num_computed_tokens=0,
                                     output_token_ids=[])

    def drop(r):
        for f in r["obj"].mm_features:
            cache.pop(f.identifier, None)
        r["obj"] = None

    with torch.no_grad():
        for _ in range(STEPS):
            engine.admit(make_obj)
            for r in list(engine.live):
                event = data.draw(st.sampled_from(["run"] * 6 + ["abort", "preempt", "evict"]))
                if event == "abort":
                    drop(r)
                    engine.live.remove(r)
                elif event == "preempt":  # freed, later recomputed from token 0: a new state, same req_id
                    drop(r)
                    r["done"] = 0
                    r["obj"] = make_obj(r)
                elif event == "evict" and r["obj"].mm_features:  # encoded again: a new tensor
                    f = r["obj"].mm_features[data.draw(st.integers(0, len(r["obj"].mm_features) - 1))]
                    cache[f.identifier] = cache[f.identifier].clone()
            windows = engine.schedule()
            if not windows:
                continue
            states = [r["obj"] for r, _, _ in windows]
            for st_, (_, p, _) in zip(states, windows):
                st_.num_computed_tokens = p
            counts = {r["rid"]: n for r, _, n in windows}
            ids = _step_ids(windows)
            want, _ = engine_step(vl, dict(hidden=H, levels=0, shift=0), states, cache, counts, ids, embed)
            got = our_vllm.gather_mm_embeddings(states, cache, ids, num_scheduled_tokens=counts, embed_tokens=embed,
                                                max_tokens=64, max_requests=16)
            assert torch.equal(got, want)
            _steps_run["vllm"] += 1
            _advance(engine, windows, drop)
        for r in engine.live:
            drop(r)
        engine.live = windows = states = r = st_ = None
        gc.collect()
        our_vllm.gather_mm_embeddings([], cache, torch.zeros(0, dtype=torch.long), num_scheduled_tokens=[],
                                      embed_tokens=embed, max_tokens=64, max_requests=16)
        _nothing_held(resident_for(embed, embed.weight, embed.weight, 0, "auto", 64, 16))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_sglang_lifecycle_matches_the_engine_every_step(sg, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    embed = nn.Embedding(VOCAB, H)
    engine = Engine(data, gen, data.draw(st.sampled_from([6, 12, 40])))
    ours_cache = our_sglang.EmbeddingCache(1 << 20)
    sg.mm_schedule.init_mm_embedding_cache(1 << 20)
    mapping = {sg.Modality.IMAGE: lambda items: [it.feature for it in items]}
    keys = itertools.count(1 << 20)

    def make_obj(r):
        items = []
        for off, length, emb in r["feats"]:
            item = sg.MultimodalDataItem(modality=sg.Modality.IMAGE, offsets=[(off, off + length - 1)], feature=emb)
            item.set_hash(next(keys))
            items.append(item)
        return sg.MultimodalInputs(mm_items=items) if items else None

    def drop(r):
        r["obj"] = None

    def pad(r):
        return [it.pad_value for it in r["obj"].mm_items] if r["obj"] is not None else []

    with torch.no_grad():
        for _ in range(STEPS):
            engine.admit(make_obj)
            for r in list(engine.live):
                event = data.draw(st.sampled_from(["run"] * 6 + ["abort", "retract", "evict"]))
                if event == "abort":
                    drop(r)
                    engine.live.remove(r)
                elif event == "retract":  # memory ran short: the same request, its prefill started again
                    r["done"] = 0
                elif event == "evict":  # both embedding caches lose what they held
                    ours_cache.clear()
                    sg.mm_schedule.init_mm_embedding_cache(1 << 20)
            windows = engine.schedule()
            if not windows:
                continue
            mm = [r["obj"] for r, _, _ in windows]
            prefix = [p for _, p, _ in windows]
            extend = [n for _, _, n in windows]
            ids = _step_ids(windows, pad)
            got = {}
            for who in ("engine", "ours"):
                fb = SimpleNamespace(
                    forward_mode=SimpleNamespace(is_decode=lambda: False, is_target_verify=lambda: False),
                    contains_mm_inputs=lambda: any(m is not None for m in mm), mm_inputs=list(mm),
                    extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=extend, spec_algorithm=None,
                    input_embeds=None)
                lm = SimpleNamespace(get_input_embeddings=lambda: embed)
                if who == "engine":
                    got[who] = sg.mm_utils.prepare_mm_inputs(ids.clone(), fb, lm, {}, None, mapping, None, {})
                else:
                    got[who] = our_sglang.prepare_mm_inputs(ids.clone(), fb, lm, {}, None, mapping, None, {},
                                                            cache=ours_cache, max_tokens=64, max_requests=16)
            assert torch.equal(got["ours"], got["engine"])
            _steps_run["sglang"] += 1
            _advance(engine, windows, drop)
        for r in engine.live:
            drop(r)
        engine.live = windows = mm = r = fb = got = None
        gc.collect()
        our_sglang.embed_mm_inputs([], [], [], torch.zeros(0, dtype=torch.long), embed, cache=ours_cache,
                                   max_tokens=64, max_requests=16)
        _nothing_held(resident_for(embed, embed.weight, embed.weight, 0, "auto", 64, 16))


def teardown_module(module):
    """With ``LIFECYCLE_REPORT=path``: how many steps each adapter was checked on."""
    path = os.environ.get("LIFECYCLE_REPORT")
    if path:
        with open(path, "w") as f:
            f.write(f"{_steps_run}\n")
