"""``python -m bench --peers``: ours beside the engines' own code, one run, same batches.

SGLang 0.5.23's ``embed_mm_inputs`` and vLLM 0.33.0's runner ``_gather_mm_embeddings`` +
``embed_input_ids`` (loaded from their published wheels by ``bench.engine_code``; on a
machine without a registry export them first, see the README) against our drop-ins
(``mmassembler.engines``) and the resident ``Assembler`` (requests registered once), on the
resident bench's scenarios, steady state: every embedding already encoded (SGLang's
embedding cache and ours warm; vLLM's encoder cache filled). Each path's output is
checked bitwise against our reference first.

Per path: host time (call -> return, device idle before each call), wall (call +
synchronize) and stream time (CUDA events around eager calls, so host gaps count; the
engines' paths cannot be captured in a CUDA graph). The copy floor is the bytes the
output needs over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from bench.bench_resident import RESIDENT_SCENARIOS, host_us
from bench.engine_code import VllmModel, load_sglang, load_vllm, vllm_runner
from bench.harness import copy_bandwidth, gpu_time_us, wall_time_us
from bench.scenarios import build
from mmassembler import Assembler, assemble
from mmassembler.engines import sglang as our_sglang
from mmassembler.engines import vllm as our_vllm

logger = logging.getLogger("bench.peers")
PATHS = ("sglang", "ours_sglang", "vllm", "ours_vllm", "ours_resident")


def sglang_batch(sg, b):
    """The engine's items (features = the embeddings, so encoding is a lookup) and ids with
    each item's pad value at its placeholders."""
    mm_inputs, ids, base = [], b.input_ids.clone(), 0
    for r in b.requests:
        items = []
        for it in r.items:
            item = sg.MultimodalDataItem(modality=sg.Modality.IMAGE, offsets=list(it.spans),
                                         feature=it.embedding)
            item.set_hash(int(it.key))
            for s, e in it.spans:
                lo, hi = max(s, r.prefix_len), min(e + 1, r.prefix_len + r.extend_len)
                if lo < hi:
                    ids[base + lo - r.prefix_len: base + hi - r.prefix_len] = item.pad_value
            items.append(item)
        mm_inputs.append(sg.MultimodalInputs(mm_items=items))
        base += r.extend_len
    return mm_inputs, ids


def vllm_batch(vl, b):
    """Real ``CachedRequestState``s, the filled encoder cache and the scheduler's counts."""
    states, cache, counts = [], {}, {}
    for i, r in enumerate(b.requests):
        feats = []
        for j, it in enumerate(r.items):
            (s, e), = it.spans
            ident = f"r{i}i{j}"
            feats.append(vl.MultiModalFeatureSpec(data=None, modality="image", identifier=ident,
                                                  mm_position=vl.PlaceholderRange(offset=s, length=e - s + 1)))
            cache[ident] = it.embedding
        st = vl.CachedRequestState(req_id=f"req{i}", prompt_token_ids=None, mm_features=feats,
                                   sampling_params=None, generator=None, block_ids=([],),
                                   num_computed_tokens=r.prefix_len, output_token_ids=[],
                                   prompt_embeds=torch.empty(r.prompt_len, 1))
        states.append(st)
        counts[st.req_id] = r.extend_len
    return states, cache, counts


def calls(sg, vl, b) -> dict:
    """One zero-argument call per path, each returning the batch's embeddings."""
    embed = nn.Embedding.from_pretrained(b.weight, freeze=True)
    mm_inputs, sg_ids = sglang_batch(sg, b)
    prefix = [r.prefix_len for r in b.requests]
    extend = [r.extend_len for r in b.requests]
    mapping = {sg.Modality.IMAGE: lambda items: [it.feature for it in items]}
    sg.mm_schedule.init_mm_embedding_cache(64 << 30)
    cache = our_sglang.EmbeddingCache(64 << 30)
    states, enc_cache, counts = vllm_batch(vl, b)
    runner = vllm_runner(states, enc_cache)
    sched = SimpleNamespace(total_num_scheduled_tokens=b.num_tokens, num_scheduled_tokens=counts)
    model = VllmModel(vl, embed, oov_mm_tokens=True)  # the bench's placeholder ids lie past the vocabulary
    n_items = sum(len(r.items) for r in b.requests)
    asm = Assembler(weight=b.weight, max_tokens=b.num_tokens, max_requests=len(b.requests),
                    max_items=max(1, n_items), max_runs=max(1, n_items))
    handles = np.array([asm.add_request(r.items, r.prompt_len) for r in b.requests])
    p, e = np.array(prefix), np.array(extend)

    def vllm_engine():
        mm, is_mm = vl.gather_mm_embeddings(runner, sched, 0)
        return model.embed_input_ids(b.input_ids, mm, is_multimodal=is_mm)

    with torch.no_grad():
        return {
            # the engine clamps ids in place: each call gets the step's fresh ids, as in serving
            "sglang": lambda: sg.mm_utils.embed_mm_inputs(mm_inputs, prefix, extend, sg_ids.clone(), embed,
                                                          None, mapping)[0],
            "ours_sglang": lambda: our_sglang.embed_mm_inputs(mm_inputs, prefix, extend, sg_ids.clone(),
                                                              embed, None, mapping, cache=cache)[0],
            "vllm": vllm_engine,
            "ours_vllm": lambda: our_vllm.gather_mm_embeddings(states, enc_cache, b.input_ids,
                                                               num_scheduled_tokens=counts, embed_tokens=embed),
            "ours_resident": lambda: asm.assemble(handles, p, e, b.input_ids),
        }


def measure(sg, vl, b, bw: float, repeat: int) -> dict:
    hidden, n = b.weight.shape[1], b.num_tokens
    row = dict(scenario=b.scenario.name, tokens=n, mm_rows=b.num_mm_rows,
               floor_us=2 * n * hidden * b.weight.element_size() / bw * 1e6)
    ref = assemble(b.requests, b.input_ids, weight=b.weight, backend="torch")
    sync = torch.cuda.synchronize
    with torch.no_grad():
        for name, fn in calls(sg, vl, b).items():
            got = fn()
            row[f"{name}_equal"] = bool(torch.equal(got, ref))
            if not row[f"{name}_equal"]:
                logger.error("%s: %s differs from the reference", b.scenario.name, name)
            row[f"host_{name}_us"] = host_us(fn, repeat, sync)
            row[f"wall_{name}_us"] = wall_time_us(fn, repeat=repeat)
            row[f"stream_{name}_us"] = gpu_time_us(fn, capturable=False)
    return row


def table(rows) -> str:
    head = ["scenario", "floor"] + [f"{k} {p}" for p in PATHS for k in ("wall",)] + \
        [f"host {p}" for p in PATHS] + ["sglang/ours", "vllm/ours", "sglang/resident"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["scenario"], f"{r['floor_us']:.0f}"]
        cells += [f"{r[f'wall_{p}_us']:.0f}" for p in PATHS]
        cells += [f"{r[f'host_{p}_us']:.0f}" for p in PATHS]
        cells += [f"{r['wall_sglang_us'] / r['wall_ours_sglang_us']:.2f}x",
                  f"{r['wall_vllm_us'] / r['wall_ours_vllm_us']:.2f}x",
                  f"{r['wall_sglang_us'] / r['wall_ours_resident_us']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", nargs="*", default=[])
    ap.add_argument("--repeat", type=int, default=100)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        logger.error("--peers times GPU paths: run it on a CUDA machine")
        return 2
    sg, vl = load_sglang(), load_vllm()
    bw = copy_bandwidth("cuda")
    rows = []
    for sc in RESIDENT_SCENARIOS:
        if args.scenario and not any(k in sc.name for k in args.scenario):
            continue
        rows.append(measure(sg, vl, build(sc, device="cuda"), bw, args.repeat))
        logger.info("%s", rows[-1])
    text = table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(), repeat=args.repeat,
                    copy_bandwidth_GBps=bw / 1e9)
        (args.out / "peers.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        (args.out / "peers.txt").write_text(text + "\n")
    return 0 if all(r[f"{p}_equal"] for r in rows for p in PATHS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
