"""Serving-like workloads through every path: the engines' own code and ours, side by side.

A workload is a sequence of steps; a step is a list of windows ``(request, prefix, extend)``
over requests given as plain data (``Req``: prompt ids, items with key, span and rows).
A request meets a path the first step it appears (the path builds its own objects then,
untimed, as an engine builds them at admission) and leaves after its last step (the path
drops them; our adapters remove it at their next call, inside the timing). Every path
keeps its objects across a request's steps, as the engines do.

Paths (``DRIVERS``):
- ``sglang`` / ``sglang_routine``: SGLang 0.5.23's own ``embed_mm_inputs`` and
  ``general_mm_embed_routine``, its embedding cache, an encoder that returns each item's
  feature;
- ``vllm``: vLLM 0.33.0's runner ``_gather_mm_embeddings`` + ``embed_input_ids``, with
  every feature's encoder output in its ``encoder_cache`` (fresh identifiers);
- ``ours_sglang`` / ``ours_sglang_routine`` / ``ours_vllm``: our drop-ins on the same
  engine objects;
- ``assembler``: an ``Assembler`` (register a step's new requests, the step, remove the
  finished ones, all timed) with the same encoder and an ``EmbeddingCache``;
- ``stateless``: ``assemble`` on ``Request``s over ``Item``s made at admission;
- ``plugin_sglang_routine`` / ``plugin_vllm``: the engine's own calling code with
  mmassembler turned on through its plugin (made last, and the engine restored once
  their path is done: ``Driver.close``).

Each step's output of every path is compared bit for bit with ``reference`` (the torch
backend on precomputed embeddings).
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from mmassembler import Assembler, EmbeddingCache, Item, Request, assemble
from mmassembler.engines import sglang as our_sglang
from mmassembler.engines import vllm as our_vllm

_keys = itertools.count(1 << 32)  # never-seen item keys, process-wide


@dataclass
class ReqItem:
    span: tuple  # inclusive (start, end)
    feature: torch.Tensor  # [rows, hidden]: what the encoder returns (also the reference)


@dataclass
class Req:
    prompt: torch.Tensor  # whole prompt ids on the device
    items: list = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return int(self.prompt.shape[0])


def step_ids(reqs: dict, windows) -> torch.Tensor:
    return torch.cat([reqs[r].prompt[p:p + e] for r, p, e in windows]) if windows else torch.zeros(
        0, dtype=torch.int64, device=next(iter(reqs.values())).prompt.device)


def reference(reqs: dict, windows, ids, weight) -> torch.Tensor:
    rq = [Request([Item(j, [it.span], embedding=it.feature) for j, it in enumerate(reqs[r].items)], p, e,
                  reqs[r].prompt_len) for r, p, e in windows]
    return assemble(rq, ids, weight=weight, backend="torch")


class Driver:
    """One path: ``prepare(windows)`` (untimed: objects for new requests, the step's
    arguments) returns the timed call; ``finish(rids)`` drops requests (untimed)."""

    name = ""

    def __init__(self, reqs: dict, weight: torch.Tensor, limits: dict | None = None):
        self.reqs, self.weight = reqs, weight
        self.embed = nn.Embedding.from_pretrained(weight, freeze=True)
        self.limits = limits or {}  # the engine's max_tokens / max_requests, for our adapters
        self.live: dict = {}

    def prepare(self, windows):
        for r, _, _ in windows:
            if r not in self.live:
                self.live[r] = self.admit(r)
        return self.call(windows)

    def finish(self, rids) -> None:
        for r in rids:
            self.live.pop(r, None)

    def admit(self, r):
        raise NotImplementedError

    def call(self, windows):
        raise NotImplementedError

    def close(self) -> None:
        """After the path's last step (the plugin paths restore the engine here)."""


class Sglang(Driver):
    name = "sglang"

    def __init__(self, reqs, weight, sg, ours: bool = False, routine: bool = False, limits=None):
        super().__init__(reqs, weight, limits)
        self.sg, self.ours, self.routine = sg, ours, routine
        self.mapping = {sg.Modality.IMAGE: lambda items: [it.feature for it in items]}
        self.cache = our_sglang.EmbeddingCache(1 << 30) if ours else None
        if not ours:
            sg.mm_schedule.init_mm_embedding_cache(1 << 30)
        self.lm = _LanguageModel(self.embed)

    def admit(self, r):
        sg, req = self.sg, self.reqs[r]
        items, ids = [], req.prompt.clone()
        for it in req.items:
            item = sg.MultimodalDataItem(modality=sg.Modality.IMAGE, offsets=[it.span], feature=it.feature)
            item.set_hash(next(_keys))
            ids[it.span[0]:it.span[1] + 1] = item.pad_value
            items.append(item)
        return sg.MultimodalInputs(mm_items=items) if items else None, ids

    def call(self, windows):
        sg = self.sg
        mm = [self.live[r][0] for r, _, _ in windows]
        ids = torch.cat([self.live[r][1][p:p + e] for r, p, e in windows])
        prefix, extend = [p for _, p, _ in windows], [e for _, _, e in windows]
        if self.routine:
            fb = SimpleNamespace(
                forward_mode=SimpleNamespace(is_decode=lambda: False, is_target_verify=lambda: False),
                contains_mm_inputs=lambda: any(m is not None for m in mm), mm_inputs=list(mm),
                extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=extend, spec_algorithm=None,
                input_embeds=None)
            fn = our_sglang.general_mm_embed_routine if self.ours else sg.mm_utils.general_mm_embed_routine
            extra = dict(cache=self.cache, **self.limits) if self.ours else {}
            return lambda: fn(ids.clone(), fb, self.lm, None, self.mapping, **extra)
        keep = [i for i, m in enumerate(mm) if m is not None]  # the routine's own filtering
        if len(keep) != len(mm):
            # embed_mm_inputs takes multimodal requests only: text rows between them come from
            # the lookup; a batch with text-only requests goes through the routine instead
            raise ValueError("embed_mm_inputs batches are all multimodal here")
        if self.ours:
            return lambda: our_sglang.embed_mm_inputs(mm, prefix, extend, ids.clone(), self.embed, None,
                                                      self.mapping, cache=self.cache, **self.limits)[0]
        return lambda: sg.mm_utils.embed_mm_inputs(mm, prefix, extend, ids.clone(), self.embed, None,
                                                   self.mapping)[0]


class _LanguageModel:
    """What ``general_mm_embed_routine`` calls: the embedding, and the model on its result
    (here the identity, so the routine returns the embeddings)."""

    def __init__(self, embed):
        self.embed = embed

    def get_input_embeddings(self):
        return self.embed

    def __call__(self, input_ids=None, forward_batch=None, input_embeds=None, **kwargs):
        return input_embeds


class Vllm(Driver):
    name = "vllm"

    def __init__(self, reqs, weight, vl, ours: bool = False, limits=None):
        super().__init__(reqs, weight, limits)
        from mmassembler.testing.engine_code import VllmModel

        self.vl, self.ours = vl, ours
        self.encoder_cache: dict = {}
        self.model = VllmModel(vl, self.embed, oov_mm_tokens=True)

    def admit(self, r):
        vl, req = self.vl, self.reqs[r]
        feats = []
        for it in req.items:
            ident = f"f{next(_keys)}"
            s, e = it.span
            feats.append(vl.MultiModalFeatureSpec(data=None, modality="image", identifier=ident,
                                                  mm_position=vl.PlaceholderRange(offset=s, length=e - s + 1)))
            self.encoder_cache[ident] = it.feature  # the encoder ran at admission (vLLM's scheduling)
        return vl.CachedRequestState(req_id=f"req{r}-{next(_keys)}", prompt_token_ids=None, mm_features=feats,
                                     sampling_params=None, generator=None, block_ids=([],),
                                     num_computed_tokens=0, output_token_ids=[],
                                     prompt_embeds=torch.empty(req.prompt_len, 1))

    def finish(self, rids) -> None:
        for r in rids:
            st = self.live.pop(r, None)
            if st is not None:
                for f in st.mm_features:
                    self.encoder_cache.pop(f.identifier, None)

    def call(self, windows):
        states = [self.live[r] for r, _, _ in windows]
        for st, (_, p, _) in zip(states, windows):
            st.num_computed_tokens = p
        counts = {st.req_id: e for st, (_, _, e) in zip(states, windows)}
        ids = step_ids(self.reqs, windows)
        if self.ours:
            return lambda: our_vllm.gather_mm_embeddings(states, self.encoder_cache, ids,
                                                         num_scheduled_tokens=counts, embed_tokens=self.embed,
                                                         **self.limits)
        from mmassembler.testing.engine_code import vllm_runner

        runner = vllm_runner(states, self.encoder_cache)
        sched = SimpleNamespace(total_num_scheduled_tokens=int(ids.shape[0]), num_scheduled_tokens=counts)

        def engine():
            mm, is_mm = self.vl.gather_mm_embeddings(runner, sched, 0)
            return self.model.embed_input_ids(ids, mm, is_multimodal=is_mm)

        return engine


class PluginSglang(Sglang):
    """SGLang's own routine, called as a model file calls it, with mmassembler turned on
    through its plugin (``engines.sglang.apply``: what ``MMASSEMBLER_ENGINES=1`` does)."""

    name = "plugin_sglang_routine"

    def __init__(self, reqs, weight, sg, limits=None):
        super().__init__(reqs, weight, sg, routine=True, limits=limits)
        our_sglang.apply(**self.limits)

    def call(self, windows):
        mm = [self.live[r][0] for r, _, _ in windows]
        ids = torch.cat([self.live[r][1][p:p + e] for r, p, e in windows])
        fb = SimpleNamespace(
            forward_mode=SimpleNamespace(is_decode=lambda: False, is_target_verify=lambda: False),
            contains_mm_inputs=lambda: any(m is not None for m in mm), mm_inputs=list(mm),
            extend_prefix_lens_cpu=[p for _, p, _ in windows], extend_seq_lens_cpu=[e for _, _, e in windows],
            spec_algorithm=None, input_embeds=None)
        routine = self.sg.mm_utils.general_mm_embed_routine  # the engine's name, now ours
        return lambda: routine(ids.clone(), fb, self.lm, None, self.mapping)

    def close(self) -> None:
        our_sglang.unapply()


class PluginVllm(Vllm):
    """vLLM's runner path as ``execute_model`` calls it (``_gather_mm_embeddings`` then the
    model's default ``embed_input_ids``), with mmassembler turned on through its plugin
    (``engines.vllm.apply``)."""

    name = "plugin_vllm"

    def __init__(self, reqs, weight, vl, limits=None):
        super().__init__(reqs, weight, vl, limits=limits)
        embed = self.embed

        class Model(vl.SupportsMultiModal):  # a VLM keeping the default embed_input_ids
            _has_oov_mm_tokens = False

            def get_language_model(self):
                return SimpleNamespace(embed_input_ids=embed)
        self.plugin_model = Model()
        our_vllm.apply(**{k: v for k, v in self.limits.items() if v is not None})

    def call(self, windows):
        states = [self.live[r] for r, _, _ in windows]
        for st, (_, p, _) in zip(states, windows):
            st.num_computed_tokens = p
        counts = {st.req_id: e for st, (_, _, e) in zip(states, windows)}
        ids = step_ids(self.reqs, windows)
        runner = SimpleNamespace(
            input_batch=SimpleNamespace(req_ids=[s.req_id for s in states]), requests={s.req_id: s for s in states},
            encoder_cache=self.encoder_cache, _get_encoder_output_from_cache=self.encoder_cache.get,
            is_multimodal_pruning_enabled=False, uses_mrope=False, enable_prompt_embeds=False,
            model=self.plugin_model, input_ids=SimpleNamespace(gpu=ids), max_num_tokens=None, max_num_reqs=None)
        sched = SimpleNamespace(total_num_scheduled_tokens=int(ids.shape[0]), num_scheduled_tokens=counts)
        gather = self.vl.runner.GPUModelRunner._gather_mm_embeddings  # the engine's name, now ours

        def step():
            mm, is_mm = gather(runner, sched)
            return runner.model.embed_input_ids(ids, multimodal_embeddings=mm, is_multimodal=is_mm)
        return step

    def close(self) -> None:
        our_vllm.unapply()


class Ours(Driver):
    """The ``Assembler`` (``stateless=False``) or the stateless ``assemble``."""

    def __init__(self, reqs, weight, stateless: bool = False, limits=None):
        super().__init__(reqs, weight, limits)
        self.stateless = stateless
        self.name = "stateless" if stateless else "assembler"
        self.encoders = {"image": lambda items: [it.data for it in items]}
        self.cache = EmbeddingCache(1 << 30)
        lim = self.limits
        self.asm = None if stateless else Assembler(
            weight=weight, max_tokens=lim.get("max_tokens") or 1 << 17, max_requests=lim.get("max_requests") or 1024,
            encoders=self.encoders, cache=self.cache)
        self.handles: dict = {}
        self.leaving: list = []

    def admit(self, r):
        req = self.reqs[r]
        return [Item(next(_keys), [it.span], data=it.feature) for it in req.items]

    def finish(self, rids) -> None:
        for r in rids:
            self.live.pop(r, None)
            if r in self.handles:
                self.leaving.append(self.handles.pop(r))

    def call(self, windows):
        ids = step_ids(self.reqs, windows)
        p = np.array([x for _, x, _ in windows], np.int64)
        e = np.array([x for _, _, x in windows], np.int64)
        if self.stateless:
            rq = [Request(self.live[r], pp, ee, self.reqs[r].prompt_len) for r, pp, ee in windows]
            return lambda: assemble(rq, ids, weight=self.weight, encoders=self.encoders, cache=self.cache)
        new = [r for r, _, _ in windows if r not in self.handles]
        asm, leaving = self.asm, self.leaving
        self.leaving = []

        def step():
            if leaving:
                asm.remove_requests(leaving)
            if new:
                self.handles.update(zip(new, asm.add_requests([(self.live[r], self.reqs[r].prompt_len)
                                                                for r in new])))
            return asm.assemble([self.handles[r] for r, _, _ in windows], p, e, ids)

        return step


def drivers(reqs: dict, weight: torch.Tensor, sg=None, vl=None, names=None, limits: dict | None = None):
    """``(name, driver)`` for every path that can run here (engines only when their code
    loaded), each made when reached (the plugin paths patch the engine). ``limits``
    (``max_tokens``: the step's token budget, ``max_requests``: requests running at once)
    are what an engine hands our adapters and Assembler, as it knows them."""
    made = {}
    if sg is not None:
        made["sglang"] = Sglang(reqs, weight, sg)
        made["sglang_routine"] = Sglang(reqs, weight, sg, routine=True)
        made["ours_sglang"] = Sglang(reqs, weight, sg, ours=True, limits=limits)
        made["ours_sglang_routine"] = Sglang(reqs, weight, sg, ours=True, routine=True, limits=limits)
    if vl is not None:
        made["vllm"] = Vllm(reqs, weight, vl)
        made["ours_vllm"] = Vllm(reqs, weight, vl, ours=True, limits=limits)
    made["assembler"] = Ours(reqs, weight, limits=limits)
    made["stateless"] = Ours(reqs, weight, stateless=True)
    # last: they point the engine's own functions at ours until their path is done
    if sg is not None and (names is None or "plugin_sglang_routine" in names):
        made["plugin_sglang_routine"] = lambda: PluginSglang(reqs, weight, sg, limits=limits)
    if vl is not None and (names is None or "plugin_vllm" in names):
        made["plugin_vllm"] = lambda: PluginVllm(reqs, weight, vl, limits=limits)
    for k, v in made.items():
        if names is None or k in names:
            yield k, v() if callable(v) and not isinstance(v, Driver) else v


def run_steps(driver: Driver, reqs: dict, steps, weight, *, check: bool, sync, leave=None):
    """Run ``steps`` through ``driver``: per step (host µs, wall µs); raises if a checked
    output differs from the reference. ``leave[i]``: requests whose last step is ``i``."""
    times = []
    for i, windows in enumerate(steps):
        call = driver.prepare(windows)
        sync()
        t0 = time.perf_counter()
        got = call()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        times.append((1e6 * (t1 - t0), 1e6 * (t2 - t0)))
        if check:
            want = reference(reqs, windows, step_ids(reqs, windows), weight)
            if not torch.equal(got, want):
                raise AssertionError(f"{driver.name}: step {i} differs from the reference")
        del got
        if leave is not None and leave[i]:
            driver.finish(leave[i])
    return times


def summary(values) -> dict:
    v = sorted(values)
    return dict(mean=statistics.fmean(v), p50=v[len(v) // 2], p99=v[min(len(v) - 1, int(0.99 * len(v)))],
                n=len(v))
