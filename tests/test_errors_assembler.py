"""Bad input to the Assembler: a typed error before any write; output, device tables and
cache unchanged; the Assembler still works afterwards."""

import pytest
import torch

from mmassembler import (cache_key, Assembler, AssemblyError, BatchShapeError, CapacityError, ChunkWindowError,
                         EmbeddingCache, EmbeddingFormatError, Item, MissingEncoderError, Request,
                         RowCountError, SpanError, UnknownHandleError, assemble_oracle)

H = 8


def _setup(device, backend="triton"):
    weight = torch.randn(20, H, device=device)
    cache = EmbeddingCache(1 << 20)
    enc = {"image": lambda items: [torch.randn(it.data, H, device=device) for it in items]}
    cache.put(cache_key(enc["image"], 99), torch.randn(3, H, device=device))
    asm = Assembler(weight=weight, max_tokens=64, max_requests=3, max_items=8, max_runs=8,
                    encoders=enc, cache=cache, backend=backend)
    items = [Item(1, [(2, 4)], embedding=torch.randn(3, H, device=device)),
             Item(2, [(6, 9)], data=4)]
    h = asm.add_request(items, prompt_len=100)
    return asm, h, items, cache


def _state(asm, cache):
    t = asm.tables
    return ([x.clone() for x in (t.runs, t.step)], dict(cache._entries),
            cache.stats.hits, cache.stats.misses, asm.registry.snapshot())


STEP_CASES = [
    # name, kwargs of assemble (h is replaced by the live handle), error
    ("unknown handle", dict(handles=[2]), UnknownHandleError),
    ("negative handle", dict(handles=[-1]), UnknownHandleError),
    ("handle zero", dict(handles=[0]), UnknownHandleError),
    ("handle past capacity", dict(handles=[4]), UnknownHandleError),
    ("huge handle", dict(handles=[2**62]), UnknownHandleError),
    ("float handle", dict(handles=[0.5]), BatchShapeError),
    ("lengths differ", dict(prefix_lens=[0, 0]), BatchShapeError),
    ("window past prompt", dict(prefix_lens=[95], extend_lens=[6]), ChunkWindowError),
    ("negative prefix", dict(prefix_lens=[-1]), ChunkWindowError),
    ("too many tokens", dict(extend_lens=[65]), CapacityError),
    ("ids length", dict(ids=5), BatchShapeError),
    ("ids float", dict(ids="float"), BatchShapeError),
    ("duplicate handle", dict(handles=["h", "h"], prefix_lens=[0, 0], extend_lens=[3, 3]),
     BatchShapeError),
    ("device handles", dict(handles="tensor"), BatchShapeError),
    ("overlapping out", dict(out="overlap"), BatchShapeError),
    ("out dtype", dict(out="half"), BatchShapeError),
]


@pytest.mark.parametrize("name,kwargs,err", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_bad_step_raises_typed_error_and_changes_nothing(device, name, kwargs, err):
    asm, h, items, cache = _setup(device)
    handles = kwargs.get("handles", [h])
    handles = [h if x == "h" else x for x in handles] if isinstance(handles, list) else torch.tensor(
        [h], device=device if device != "cpu" else "meta")
    p, e = kwargs.get("prefix_lens", [0]), kwargs.get("extend_lens", [10])
    ids_arg = kwargs.get("ids")
    n = sum(e) if isinstance(ids_arg, str) or ids_arg is None else ids_arg
    ids = torch.zeros(n, dtype=torch.float32 if ids_arg == "float" else torch.int64, device=device)
    out = torch.full((sum(e) if len(e) == len(p) else 10, H), 7.0, device=device)
    if kwargs.get("out") == "overlap":
        out = torch.full((1, H + sum(e)), 7.0, device=device).as_strided((sum(e), H), (1, 1))
    elif kwargs.get("out") == "half":
        out = out.half()
    before_out = out.clone()
    before = _state(asm, cache)
    with pytest.raises(err) as info:
        asm.assemble(handles, p, e, ids, out=out)
    assert isinstance(info.value, AssemblyError)
    assert torch.equal(out, before_out)
    after = _state(asm, cache)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1:] == after[1:]
    # still works (positions 0-5: text and the precomputed item)
    ids = torch.randint(0, 20, (6,), device=device)
    got = asm.assemble([h], [0], [6], ids)
    want, _ = assemble_oracle([Request(items, 0, 6)], ids.cpu(), lambda it: it.embedding.cpu(),
                              weight=asm.weight.cpu())
    assert torch.equal(got.cpu(), want)


SOURCE_CASES = {
    "rows mismatch": (lambda d: Item(5, [(0, 3)], embedding=torch.randn(3, H, device=d)), RowCountError),
    "wrong hidden": (lambda d: Item(5, [(0, 3)], embedding=torch.randn(4, H + 1, device=d)),
                     EmbeddingFormatError),
    "int embedding": (lambda d: Item(5, [(0, 3)], embedding=torch.zeros(4, H, dtype=torch.int32,
                                                                       device=d)), EmbeddingFormatError),
    "no encoder": (lambda d: Item(5, [(0, 3)], modality="audio"), MissingEncoderError),
    "encoder rows": (lambda d: Item(5, [(0, 3)], data=3), RowCountError),
    "same key, other rows": (None, RowCountError),
}


@pytest.mark.parametrize("name", list(SOURCE_CASES))
def test_bad_source_is_typed_and_names_request_and_item(device, name):
    asm, h, items, cache = _setup(device)
    make, err = SOURCE_CASES[name]
    if make is None:  # a cached key asked with another row count by a second item
        bad = [Item(99, [(0, 2)]), Item(99, [(4, 7)])]
    else:
        bad = [make(device)]
    h2 = asm.add_request(bad, prompt_len=10)
    out = torch.full((14, H), 7.0, device=device)
    before = _state(asm, cache)
    with pytest.raises(err) as info:
        asm.assemble([h, h2], [0, 0], [6, 8], torch.zeros(14, dtype=torch.int64, device=device), out=out)
    assert info.value.request == 1 and info.value.item_key in (5, 99)
    assert torch.equal(out, torch.full_like(out, 7.0))
    after = _state(asm, cache)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1:] == after[1:]
    asm.remove_request(h2)
    asm.assemble([h], [0], [6], torch.zeros(6, dtype=torch.int64, device=device))


REGISTRATION_CASES = [
    ("overlapping items", [Item(1, [(0, 3)]), Item(2, [(3, 5)])], SpanError),
    ("unordered spans", [Item(1, [(5, 6), (0, 1)])], SpanError),
    ("past prompt", [Item(1, [(8, 12)])], SpanError),
    ("float span", [Item(1, [(0.0, 3)])], SpanError),
    ("bool span", [Item(1, [(True, 3)])], SpanError),
    ("huge span", [Item(1, [(0, 2**64)])], SpanError),
    ("no spans", [Item(1, [])], SpanError),
    ("not an item", [(1, [(0, 3)])], SpanError),
    ("unhashable key", [Item([1], [(0, 3)])], SpanError),
    ("mask length", [Item(1, [(0, 3)], embed_mask=[True])], SpanError),
    ("too many runs", [Item(1, [(k, k) for k in range(0, 14, 2)])], CapacityError),
]


@pytest.mark.parametrize("name,items,err", REGISTRATION_CASES, ids=[c[0] for c in REGISTRATION_CASES])
def test_bad_registration_is_typed_and_leaves_no_trace(device, name, items, err):
    asm, h, _, cache = _setup(device)
    before = _registry_state(asm.registry)
    with pytest.raises(err):
        asm.add_request(items, prompt_len=14 if name == 'too many runs' else 10)
    assert before == _registry_state(asm.registry)


def _registry_state(reg):
    """Everything registration changes: tops, counts, handles, the request and slot rows."""
    return (reg.run_top, reg.item_top, reg.live_runs, reg.live_items, list(reg._free), reg.snapshot())


def test_capacity_of_requests_and_removed_handles(device):
    asm, h, _, _ = _setup(device)
    h1 = asm.add_request([], prompt_len=4)
    h2 = asm.add_request([], prompt_len=4)
    with pytest.raises(CapacityError):
        asm.add_request([])
    asm.remove_request(h2)
    with pytest.raises(UnknownHandleError):
        asm.remove_request(h2)
    with pytest.raises(UnknownHandleError):
        asm.assemble([h2], [0], [1], torch.zeros(1, dtype=torch.int64, device=device))
    assert asm.add_request([], prompt_len=4) == h2
    asm.assemble([h, h1], [0, 0], [3, 2], torch.zeros(5, dtype=torch.int64, device=device))


def test_add_requests_registers_all_or_nothing():
    """A bad request among several: a SpanError naming its index, and nothing registered."""
    import pytest
    import torch

    from mmassembler import Assembler, Item, SpanError

    asm = Assembler(hidden=4, dtype=torch.float32, device="cpu", max_tokens=16, max_requests=4)
    good = [Item(1, [(0, 1)], embedding=torch.zeros(2, 4))]
    bad = [Item(2, [(3, 2)], embedding=torch.zeros(2, 4))]
    with pytest.raises(SpanError) as err:
        asm.add_requests([(good, 8), (bad, 8)])
    assert err.value.request == 1 and asm.registry.num_live == 0
    h = asm.add_requests([(good, 8), ([], None)])
    assert len(set(h)) == 2 and asm.registry.num_live == 2


@pytest.mark.parametrize("bad", [-1, 0, 3, -3, 2**63 - 1])
def test_out_of_range_handles_fail_with_every_slot_live(bad):
    """With every handle live, an out-of-range handle must not alias a live request
    (numpy would wrap -1 to the last row)."""
    asm = Assembler(hidden=4, dtype=torch.float32, device="cpu", max_tokens=16, max_requests=2)
    asm.add_requests([([], 8), ([], 8)])
    out = torch.full((2, 4), 7.0)
    with pytest.raises(UnknownHandleError):
        asm.assemble([bad], [0], [2], out=out)
    assert torch.equal(out, torch.full_like(out, 7.0))


def test_windows_cannot_overflow_the_token_count():
    """Windows of requests without a prompt length are bounded, so their sum cannot wrap
    around to a small count: a typed error, not a kernel reading with wrapped bases."""
    asm = Assembler(hidden=4, dtype=torch.float32, device="cpu", max_tokens=16, max_requests=9)
    h = asm.add_requests([([], None)] * 9)
    huge = 2**61 - 1  # 9 of these wrap an int64 sum around to 7
    with pytest.raises(AssemblyError):
        asm.assemble(h, [0] * 9, [huge] * 8 + [15], out=torch.zeros(7, 4))
    longest = 2**40
    with pytest.raises(CapacityError):
        asm.assemble(h, [0] * 9, [longest] * 9, out=torch.zeros(16, 4))
    with pytest.raises(BatchShapeError):
        asm.add_request([], prompt_len=2**40 + 1)
    with pytest.raises(BatchShapeError):
        Assembler(hidden=4, dtype=torch.float32, device="cpu", max_tokens=16, max_requests=2**20 + 1)
