"""Testing helpers for engine developers: hypothesis strategies, the oracle, and
``assert_assembled`` -- what ``torch.testing`` is for tensors, for an engine's own merge.

    from hypothesis import given
    from mmassembler.testing import assert_assembled, batches

    @given(batch=batches())
    def test_my_merge(batch):
        out = my_engine_merge(batch.requests, batch.input_ids, weight)   # the code under test
        assert_assembled(out, batch.requests, batch.input_ids, weight=weight)

Strategies: ``batches`` (chunked batches whose items carry precomputed embeddings:
several requests, single- and multi-span items, interleaved items, embed masks, chunk
windows at random cut points, mixed dtypes and row strides), ``schedules`` (multi-step
schedules for a resident ``Assembler``: arrivals, departures, windows that advance and
sometimes move back, precomputed, cached and encoded items), ``segment_tables`` (raw
segments for the device ops), and ``encoder_outputs`` (an encoder's answer in every form
the library accepts: a list, a 3-D tensor, or rows concatenated with ``rows_per_item``).
``assemble_oracle`` is the per-position oracle; ``assert_assembled`` compares bit for bit
and names the first wrong row by request, position and item. Needs ``hypothesis`` (the
``test`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from mmassembler.counting import count_calls, count_numpy
from mmassembler.items import Item, Request
from mmassembler.oracle import assemble_oracle, item_positions

__all__ = ["Batch", "Schedule", "Step", "assemble_oracle", "assert_assembled", "assert_bitwise_equal", "batches", "bits",
           "count_calls", "count_numpy",
           "encoded_rows", "encoder_outputs", "random_rows", "schedules", "segment_tables"]


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_rows(rows: int, cols: int, dtype: torch.dtype, strided: bool, gen: torch.Generator,
                device: str = "cpu") -> torch.Tensor:
    """Random finite values; with ``strided`` a column slice of a wider tensor (row stride > cols)."""
    width = cols + (5 if strided else 0)
    t = (torch.randn(rows, width, generator=gen) * 4).to(dtype)
    return t.to(device)[:, :cols]


@dataclass
class Batch:
    requests: list
    input_ids: torch.Tensor
    hidden: int
    ds_cols: int
    out_dtype: torch.dtype
    vocab: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@st.composite
def batches(draw, *, max_requests: int = 16, max_items: int = 6, max_hidden: int = 300,
            deepstack: bool = False, device: str = "cpu", max_span: int = 8) -> Batch:
    """A random batch whose items all carry precomputed embeddings."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hidden = draw(st.integers(1, max_hidden))
    ds_cols = hidden * draw(st.integers(1, 3)) if deepstack else 0
    out_dtype = draw(st.sampled_from(DTYPES))
    key = 0
    requests = []
    for _ in range(draw(st.integers(1, max_requests))):
        n_items = draw(st.integers(0, max_items))
        blocks = []  # (item index, span length)
        for i in range(n_items):
            for _ in range(draw(st.integers(1, 3))):
                blocks.append((i, draw(st.integers(1, max_span))))
        if draw(st.booleans()):  # interleave the spans of different items
            blocks = draw(st.permutations(blocks))
        pos = draw(st.integers(0, 4))
        spans = [[] for _ in range(n_items)]
        for i, length in blocks:
            spans[i].append((pos, pos + length - 1))
            pos += length + draw(st.integers(0, 4))
        prompt_len = pos + draw(st.integers(0, 4))
        items = []
        for i in range(n_items):
            positions = sum(e - s + 1 for s, e in spans[i])
            mask = None
            if draw(st.integers(0, 3)) == 0:
                mask = [draw(st.booleans()) for _ in range(positions)]
            rows = positions if mask is None else sum(mask)
            width = hidden + (ds_cols if draw(st.integers(0, 3)) else 0) if deepstack else hidden
            emb = random_rows(rows, width, draw(st.sampled_from(DTYPES)), draw(st.booleans()), gen,
                              device)
            key += 1
            items.append(Item(key, spans[i], embedding=emb, embed_mask=mask))
        prefix = draw(st.integers(0, prompt_len))
        extend = draw(st.integers(0, prompt_len - prefix))
        requests.append(Request(items, prefix, extend, prompt_len=prompt_len))
    n = sum(r.extend_len for r in requests)
    vocab = draw(st.integers(1, 50))
    ids = torch.randint(-3, vocab + 3, (n,), generator=gen).to(device)
    return Batch(requests, ids, hidden, ds_cols, out_dtype, vocab)


@st.composite
def segment_tables(draw, *, max_hidden: int = 300, max_sources: int = 5, max_rows: int = 40,
                   deepstack: bool = False):
    """(num_out_rows, hidden, ds_cols, [(rows, width, dtype, strided)], segments) with
    disjoint destinations, built from a random partition of the output rows."""
    hidden = draw(st.integers(1, max_hidden))
    ds_cols = draw(st.integers(1, 2 * hidden)) if deepstack else 0
    n_src = draw(st.integers(1, max_sources))
    specs = [(draw(st.integers(1, max_rows)),
              hidden + (ds_cols if deepstack and draw(st.booleans()) else 0),
              draw(st.sampled_from(DTYPES)), draw(st.booleans())) for _ in range(n_src)]
    num_out = draw(st.integers(0, max_rows * 2))
    segments, row = [], 0
    while row < num_out:
        length = draw(st.integers(1, max(1, min(num_out - row, max_rows))))
        if draw(st.booleans()):
            s = draw(st.integers(0, n_src - 1))
            n = min(length, specs[s][0])
            r0 = draw(st.integers(0, specs[s][0] - n))
            segments.append((s, r0, row, n))
            length = n
        row += length
    if segments and draw(st.booleans()):
        segments = draw(st.permutations(segments))  # the ops sort by destination themselves
    return num_out, hidden, ds_cols, specs, segments


def encoded_rows(key: tuple, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """What the test encoder returns for ``key = (k, rows, width)``: the same rows every time."""
    k, rows, width = key
    gen = torch.Generator().manual_seed(k * 100_003 + rows * 101 + width)
    return (torch.randn(rows, width, generator=gen) * 4).to(dtype).to(device)


@dataclass
class Step:
    """``(request index, prefix, extend)`` windows, and requests added/removed before it."""

    windows: list
    add: list = field(default_factory=list)
    remove: list = field(default_factory=list)


@dataclass
class Schedule:
    requests: list  # (items, prompt_len) per request
    steps: list
    hidden: int
    ds_cols: int
    dtype: torch.dtype
    fused: bool
    vocab: int
    enc_dtype: torch.dtype
    seed: int


@st.composite
def request_items(draw, *, hidden, ds_cols, key_pool, gen, device, max_items=4, max_span=6):
    """One request's items and prompt length."""
    n = draw(st.integers(0, max_items))
    blocks = [(i, draw(st.integers(1, max_span))) for i in range(n) for _ in range(draw(st.integers(1, 3)))]
    if draw(st.booleans()):
        blocks = draw(st.permutations(blocks))  # interleave items' spans
    pos = draw(st.integers(0, 3))
    spans = [[] for _ in range(n)]
    for i, length in blocks:
        spans[i].append((pos, pos + length - 1))
        pos += length + draw(st.integers(0, 3))
    items = []
    for i in range(n):
        positions = sum(e - s + 1 for s, e in spans[i])
        mask = [draw(st.booleans()) for _ in range(positions)] if draw(st.integers(0, 4)) == 0 else None
        rows = positions if mask is None else sum(mask)
        width = hidden + (ds_cols if ds_cols and draw(st.integers(0, 3)) else 0)
        if draw(st.booleans()):
            dtype = draw(st.sampled_from(DTYPES))
            strided = draw(st.booleans())
            emb = (torch.randn(rows, width + 3 * strided, generator=gen) * 4).to(dtype).to(device)
            items.append(Item(draw(st.integers(10_000, 10**9)), spans[i], embedding=emb[:, :width],
                              embed_mask=mask))
        else:  # encoded (or cached): the key fixes rows and width, so repeats agree
            key = (draw(st.sampled_from(key_pool)), rows, width)
            items.append(Item(key, spans[i], modality="image", embed_mask=mask))
    return items, pos + draw(st.integers(0, 3))


@st.composite
def schedules(draw, *, device="cpu", max_requests=4, max_steps=5, max_hidden=40, deepstack=None):
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    hidden = draw(st.integers(1, max_hidden))
    use_ds = draw(st.booleans()) if deepstack is None else deepstack
    ds_cols = hidden * draw(st.integers(1, 2)) if use_ds else 0
    key_pool = list(range(1, 7))
    requests = [draw(request_items(hidden=hidden, ds_cols=ds_cols, key_pool=key_pool, gen=gen,
                                   device=device))
                for _ in range(draw(st.integers(1, max_requests)))]
    cursors = {}
    steps = []
    pending = list(range(len(requests)))
    for _ in range(draw(st.integers(1, max_steps))):
        step = Step([])
        for r in list(cursors):
            if len(cursors) > 1 and draw(st.integers(0, 5)) == 0:
                step.remove.append(r)
                del cursors[r]
        while pending and (not cursors or draw(st.booleans())):
            r = pending.pop(0)
            step.add.append(r)
            cursors[r] = 0
        for r, cur in cursors.items():
            if draw(st.integers(0, 3)) == 0:
                continue  # not scheduled this step
            prompt = requests[r][1]
            if draw(st.integers(0, 6)) == 0:
                cur = draw(st.integers(0, cur))  # preempted: recompute from an earlier position
            extend = draw(st.integers(0, prompt - cur))
            step.windows.append((r, cur, extend))
            cursors[r] = cur + extend
        if step.windows and draw(st.booleans()):
            step.windows = draw(st.permutations(step.windows))
        steps.append(step)
    return Schedule(requests, steps, hidden, ds_cols, draw(st.sampled_from(DTYPES)),
                    draw(st.booleans()), draw(st.integers(1, 40)), draw(st.sampled_from(DTYPES)), seed)


@st.composite
def encoder_outputs(draw, tensors: list):
    """What an encoder may return for items whose rows are ``tensors``: a list (one tensor
    per item), a ``[items, rows, hidden]`` tensor (same row counts only), or the rows
    concatenated with ``rows_per_item`` (a list, a numpy array or a tensor)."""
    forms = ["list", "concatenated"]
    if tensors and len({t.shape for t in tensors}) == 1:
        forms.append("3-D")
    form = draw(st.sampled_from(forms))
    if form == "list":
        return list(tensors)
    if form == "3-D":
        return torch.stack(tensors)
    rows = [t.shape[0] for t in tensors]
    kind = draw(st.sampled_from(["list", "tensor"]))
    return torch.cat(tensors), (rows if kind == "list" else torch.tensor(rows))


_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as integers (NaN payloads and -0.0 compare as what they are)."""
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str = "output") -> None:
    """Exact equality of bits; the failure names the first mismatches. The one bitwise
    comparison the tests use."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    a, b = bits(got.cpu()), bits(want.cpu())
    if not torch.equal(a, b):
        bad = (a != b).nonzero()[:5].tolist()
        detail = [(i, got[tuple(i)].item(), want[tuple(i)].item()) for i in bad]
        raise AssertionError(f"{what}: {(a != b).sum().item()} elements differ; first "
                             f"(index, got, want): {detail}")


def _first_wrong_row(got: torch.Tensor, want: torch.Tensor) -> int | None:
    if got.shape != want.shape:
        return -1
    bad = (bits(got) != bits(want)).any(dim=1).nonzero()
    return int(bad[0]) if len(bad) else None


def assert_assembled(out: torch.Tensor, requests, input_ids: torch.Tensor, *, weight=None, before=None,
                     embedding_of=None, deepstack_out=None) -> None:
    """Assert ``out`` is the batch's input embeddings bit for bit (DESIGN §1), against the
    per-position oracle. Fused when ``weight`` is given (text rows ``weight[clamp(id)]``);
    else scatter mode, where text rows keep ``before`` (the buffer before the merge).
    ``embedding_of(item)`` gives an item's rows (default: its precomputed embedding). The
    error names the first wrong row by request, prompt position and item."""
    embedding_of = embedding_of or (lambda it: it.embedding)
    want, want_ds = assemble_oracle(requests, input_ids.cpu(), embedding_of,
                                    weight=None if weight is None else weight.cpu(),
                                    out=None if before is None else before.cpu(),
                                    deepstack_out=None if deepstack_out is None else torch.zeros_like(
                                        deepstack_out.cpu()))
    got = out.detach().cpu()
    row = _first_wrong_row(got, want.to(got.dtype))
    if row is None:
        if deepstack_out is not None and _first_wrong_row(deepstack_out.cpu(), want_ds.to(got.dtype)) is not None:
            raise AssertionError("the deepstack columns differ from the oracle")
        return
    if row < 0:
        raise AssertionError(f"out has shape {list(got.shape)}, expected {list(want.shape)}")
    base, where = 0, None
    for r, req in enumerate(requests):
        if row < base + req.extend_len:
            pos = req.prefix_len + row - base
            owner = next(((j, it) for j, it in enumerate(req.items) if pos in item_positions(it)), None)
            what = (f"item {owner[0]} (key {owner[1].key!r})" if owner else "text (no item takes it)")
            where = f"request {r}, prompt position {pos}: {what}"
            break
        base += req.extend_len
    raise AssertionError(f"row {row} ({where}) differs from the oracle: got {got[row, :4].tolist()}..., "
                         f"expected {want[row, :4].to(got.dtype).tolist()}...")
