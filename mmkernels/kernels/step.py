"""The step kernel: one launch assembles a prefill step from the resident run table.

A program owns a span of consecutive output rows and copies it in *pieces* of at most
``BLOCK_R`` rows that share a request and a run (or the text between runs). Crossing into
a new segment it finds the request (a search over the step's output bases), the
prompt position and the run holding it (a search over the request's runs; each search
loads ``SEARCH_W`` keys a round: ``log_W`` rounds of one load's latency each, where a
binary search waits for ``log2`` dependent loads); the run's row holds its source's
address, so one more load round reaches the data. The piece is copied as a masked ``BLOCK_R x BLOCK_H`` block, looping over column blocks inside
the program, so searches are paid once per segment boundary, not per tile or per column
block.

Counts (tokens, requests) are read on the device, so one launch at capacity (a CUDA
graph) serves any step that fits. Table layouts: ``mmkernels/layout.py``.
"""

import triton
import triton.language as tl

from mmkernels import layout as L
from mmkernels.kernels.convert import _convert

# constexpr globals so the kernel can read the layout
RUN_POS = tl.constexpr(L.RUN_POS)
RUN_END = tl.constexpr(L.RUN_END)
RUN_OFF = tl.constexpr(L.RUN_OFF)
RUN_STRIDE = tl.constexpr(L.RUN_STRIDE)
RUN_KIND = tl.constexpr(L.RUN_KIND)
RUN_COLS = tl.constexpr(L.RUN_COLS)
RUN_ALIGNED = tl.constexpr(L.RUN_ALIGNED)
RUN_FIELDS = tl.constexpr(L.RUN_FIELDS)
STEP_BASE = tl.constexpr(L.STEP_BASE)
STEP_PREFIX = tl.constexpr(L.STEP_PREFIX)
STEP_RUN_FIRST = tl.constexpr(L.STEP_RUN_FIRST)
STEP_RUN_END = tl.constexpr(L.STEP_RUN_END)
STEP_TOKENS = tl.constexpr(L.STEP_TOKENS)
STEP_REQUESTS = tl.constexpr(L.STEP_REQUESTS)
STEP_FIELDS = tl.constexpr(L.STEP_FIELDS)
KIND_F32 = tl.constexpr(L.KIND_F32)
KIND_F16 = tl.constexpr(L.KIND_F16)
KIND_BF16 = tl.constexpr(L.KIND_BF16)


@triton.jit
def _add(a, b):
    """Combine function of a sum (``tl.sum`` is a jitted helper of Triton's; one of ours
    is rebuilt with this module for ahead-of-time compiles under the interpreter)."""
    return a + b


@triton.jit
def _last_at_or_before(ptr, stride, lo, hi, key, SEARCH_W: tl.constexpr):
    """The last index ``i`` in ``[lo, hi)`` with ``ptr[i * stride] <= key`` (values sorted
    ascending), or ``lo - 1``. A ``SEARCH_W``-ary search: each round loads ``SEARCH_W``
    keys at once and counts those at or before ``key`` (one load's latency, where a binary
    search waits for ``log2`` dependent loads); one round covers up to ``SEARCH_W`` keys.
    """
    lanes = tl.arange(0, SEARCH_W).to(tl.int64)
    while hi - lo > SEARCH_W:  # narrow to one stride between samples that bracket key
        step = (hi - lo + SEARCH_W - 1) // SEARCH_W
        idx = lo + lanes * step
        v = tl.load(ptr + idx * stride, mask=idx < hi, other=1 << 62)
        c = tl.reduce((v <= key).to(tl.int64), 0, _add)  # sorted: samples 0..c-1 are <= key
        hi = tl.where(c == 0, lo, tl.minimum(lo + c * step, hi))  # c == 0: nothing in range
        lo = tl.where(c == 0, lo, lo + (c - 1) * step)
    idx = lo + lanes
    v = tl.load(ptr + idx * stride, mask=idx < hi, other=1 << 62)
    return lo + tl.reduce((v <= key).to(tl.int64), 0, _add) - 1


@triton.jit
def _copy_source_rows(src, ok, dst, ds_dst, has_ds_cols, hidden, ds_cols,
                      HAS_DS: tl.constexpr, MAIN_BLOCKS: tl.constexpr, DS_BLOCKS: tl.constexpr,
                      BLOCK_H: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr):
    """Copy a piece's rows: ``src``/``dst``/``ds_dst`` are ``[BLOCK_R, 1]`` row pointers."""
    OUT_DTYPE: tl.constexpr = dst.dtype.element_ty
    for c in range(MAIN_BLOCKS // 2):  # two column blocks' loads before their stores
        cols = (2 * c) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
        m = ok & (cols < hidden)
        m2 = ok & (cols + BLOCK_H < hidden)
        v = tl.load(src + cols, mask=m, other=0.0)
        v2 = tl.load(src + BLOCK_H + cols, mask=m2, other=0.0)
        tl.store(dst + cols, _convert(v, OUT_DTYPE, EMULATE_BF16_RNE), mask=m)
        tl.store(dst + BLOCK_H + cols, _convert(v2, OUT_DTYPE, EMULATE_BF16_RNE), mask=m2)
    if MAIN_BLOCKS % 2 == 1:  # the last, unpaired block
        cols = (MAIN_BLOCKS - 1) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
        m = ok & (cols < hidden)
        v = tl.load(src + cols, mask=m, other=0.0)
        tl.store(dst + cols, _convert(v, OUT_DTYPE, EMULATE_BF16_RNE), mask=m)
    if HAS_DS:  # columns past hidden; zeros for a source without them
        for c in range(DS_BLOCKS):
            cols = c * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
            m = ok & (cols < ds_cols)
            # has_ds_cols is a scalar: a per-column bound would stop 16-byte vector loads
            v = tl.load(src + hidden + cols, mask=m & has_ds_cols, other=0.0)
            tl.store(ds_dst + cols, _convert(v, OUT_DTYPE, EMULATE_BF16_RNE), mask=m)


@triton.jit
def _copy_item(anchor_ptr, off, stride, aligned, src_row, ok, dst, ds_dst, has_ds_cols, hidden,
               ds_cols, VEC: tl.constexpr, HAS_DS: tl.constexpr, MAIN_BLOCKS: tl.constexpr,
               DS_BLOCKS: tl.constexpr, BLOCK_H: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr):
    """Copy rows ``src_row`` of a source at element ``off`` of its dtype's anchor (the
    row its run starts from), ``stride`` elements apart. An aligned source's offset and stride are
    rebuilt as ``(x // VEC) * VEC``: the multiplication proves 16-byte alignment to the
    compiler (a ``tl.multiple_of`` hint on a loaded scalar is not enough)."""
    if aligned != 0:
        src = anchor_ptr + (off // VEC) * VEC + src_row * ((stride // VEC) * VEC)
        _copy_source_rows(src, ok, dst, ds_dst, has_ds_cols, hidden, ds_cols, HAS_DS, MAIN_BLOCKS,
                          DS_BLOCKS, BLOCK_H, EMULATE_BF16_RNE)
    else:
        src = anchor_ptr + off + src_row * stride
        _copy_source_rows(src, ok, dst, ds_dst, has_ds_cols, hidden, ds_cols, HAS_DS, MAIN_BLOCKS,
                          DS_BLOCKS, BLOCK_H, EMULATE_BF16_RNE)


@triton.jit(do_not_specialize=["out_stride", "ds_stride", "ids_stride", "vocab_size"])
def _assemble_step_kernel(
    out_ptr, out_stride,  # [tokens, hidden]; stride in units of OUT_UNIT elements
    ds_ptr, ds_stride,  # deepstack [tokens, ds_cols] (out_ptr without one); OUT_UNIT units
    ids_ptr, ids_stride,  # token ids (fused mode), any stride
    weight_ptr, weight_stride, vocab_size,  # token-embedding table (fused mode)
    f32_ptr, f16_ptr, bf16_ptr,  # anchors: a source is read at anchor + RUN_OFF of its dtype
    runs_ptr, step_ptr,  # resident run table (sources folded in); this step's windows
    hidden, ds_cols,  # runtime ints, specialised on divisibility by 16 (16-byte access)
    FUSED: tl.constexpr,  # text rows are weight[clamp(id)]; else left as they are
    HAS_DS: tl.constexpr,
    MAIN_BLOCKS: tl.constexpr,  # cdiv(hidden, BLOCK_H)
    DS_BLOCKS: tl.constexpr,  # cdiv(ds_cols, BLOCK_H)
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    OUT_UNIT: tl.constexpr,  # out/ds strides arrive divided by this (16 bytes' worth when aligned)
    SEARCH_W: tl.constexpr,  # keys a search loads per round (a power of two)
    EMULATE_BF16_RNE: tl.constexpr,  # interpreter only: its fp32 -> bf16 cast truncates
):
    """Write this program's share of the step's output rows.

    For output row ``t`` of request ``i`` (``base_i <= t < base_{i+1}``) at prompt position
    ``p = prefix_i + t - base_i``::

        out[t] = src[row + p - pos, :hidden]       (p in run (pos, end) of src from row)
        out[t] = weight[clamp(ids[t], 0, vocab - 1)]      (no run holds p; fused mode)
        ds[t]  = src[row + p - pos, hidden:]       (zeros: text, or no such columns)

    A program owns ``cdiv(tokens, programs)`` consecutive rows (so a grid fixed at launch
    or capture serves any step) and streams them in pieces of at most ``BLOCK_R`` rows. It
    carries its current *segment* (rows of one request inside one run, or between runs)
    from piece to piece. Entering a request costs two searches; inside a request
    the next segment is the next run or the gap before it (one load). Rows past the
    step's token count are not touched; in scatter mode neither are text rows.
    """
    num_tokens = tl.load(step_ptr + STEP_TOKENS)
    num_requests = tl.load(step_ptr + STEP_REQUESTS)
    # the first SEARCH_W output bases, loaded beside the counts (the table has at least
    # MIN_REQUEST_ROWS request rows): a step of few requests finds one without waiting
    lanes = tl.arange(0, SEARCH_W).to(tl.int64)
    first_bases = tl.load(step_ptr + (1 + lanes) * STEP_FIELDS + STEP_BASE)
    # convert it to int64 to avoid overflow: rows * stride exceeds 2**31 on large batches
    programs = tl.num_programs(0).to(tl.int64)
    span = (num_tokens + programs - 1) // programs
    row = tl.program_id(0).to(tl.int64) * span
    end = tl.minimum(row + span, num_tokens)
    r = tl.arange(0, BLOCK_R).to(tl.int64)
    # the current request (its rows end at req_end) and segment: rows [seg_start, seg_end),
    # inside run `run` (in_run: its source read from element src_off at seg_start) or in
    # the gap after it
    zero = num_tokens * 0
    req_end = zero
    base = zero
    prefix = zero
    first_run = zero
    end_run = zero
    run = zero - 1
    seg_start = zero
    seg_end = zero
    in_run = zero
    src_row0 = zero
    src_off = zero
    src_stride = zero
    kind = zero
    aligned = zero
    src_cols = zero
    while row < end:
        if row >= seg_end:  # the next segment
            if row >= req_end:  # a new request: search it, then its run holding the position
                # the last request whose output base is <= row (empty ones lose ties)
                if num_requests <= SEARCH_W:
                    i = tl.reduce(((lanes < num_requests) & (first_bases <= row)).to(tl.int64), 0,
                                  _add) - 1
                else:
                    i = _last_at_or_before(step_ptr + STEP_FIELDS + STEP_BASE, STEP_FIELDS, zero,
                                           num_requests, row, SEARCH_W)
                req = step_ptr + (1 + i) * STEP_FIELDS
                base = tl.load(req + STEP_BASE)
                prefix = tl.load(req + STEP_PREFIX)
                req_end = tl.load(req + STEP_FIELDS + STEP_BASE)  # the next row's base
                first_run = tl.load(req + STEP_RUN_FIRST)
                end_run = tl.load(req + STEP_RUN_END)
                pos = prefix + row - base
                # the last run of the request starting at or before pos
                run = _last_at_or_before(runs_ptr + RUN_POS, RUN_FIELDS, first_run, end_run, pos,
                                         SEARCH_W)
            else:  # the same request: the segment ended where the next run starts, or at its end
                pos = prefix + row - base
                nxt = tl.load(runs_ptr + (run + 1) * RUN_FIELDS + RUN_POS, mask=run + 1 < end_run,
                              other=1 << 62)
                run = tl.where(nxt <= pos, run + 1, run)
            found = run >= first_run
            at = runs_ptr + tl.maximum(run, first_run) * RUN_FIELDS
            run_pos = tl.load(at + RUN_POS, mask=found, other=0)
            run_end = tl.load(at + RUN_END, mask=found, other=0)
            src_off = tl.load(at + RUN_OFF, mask=found, other=0)
            src_stride = tl.load(at + RUN_STRIDE, mask=found, other=0)
            kind = tl.load(at + RUN_KIND, mask=found, other=0)
            src_cols = tl.load(at + RUN_COLS, mask=found, other=0)
            aligned = tl.load(at + RUN_ALIGNED, mask=found, other=0)
            next_pos = tl.load(runs_ptr + (run + 1) * RUN_FIELDS + RUN_POS, mask=run + 1 < end_run,
                               other=1 << 62)
            in_run = (found & (pos < run_end)).to(tl.int64)
            seg_start = row
            seg_end = tl.minimum(req_end, row + tl.where(in_run != 0, run_end, next_pos) - pos)
            src_row0 = pos - run_pos
        piece_end = tl.minimum(tl.minimum(row + BLOCK_R, seg_end), end)
        ok = (r < piece_end - row)[:, None]
        out_rows = (row + r)[:, None]
        dst = out_ptr + out_rows * (out_stride * OUT_UNIT)
        ds_dst = ds_ptr + out_rows * (ds_stride * OUT_UNIT)
        if in_run != 0:
            src_row = (src_row0 + row - seg_start + r)[:, None]
            has_ds_cols = src_cols > hidden
            if kind == KIND_BF16:
                _copy_item(bf16_ptr, src_off, src_stride, aligned, src_row, ok, dst, ds_dst,
                           has_ds_cols, hidden, ds_cols, 8, HAS_DS, MAIN_BLOCKS, DS_BLOCKS, BLOCK_H,
                           EMULATE_BF16_RNE)
            elif kind == KIND_F16:
                _copy_item(f16_ptr, src_off, src_stride, aligned, src_row, ok, dst, ds_dst,
                           has_ds_cols, hidden, ds_cols, 8, HAS_DS, MAIN_BLOCKS, DS_BLOCKS, BLOCK_H,
                           EMULATE_BF16_RNE)
            elif kind == KIND_F32:
                _copy_item(f32_ptr, src_off, src_stride, aligned, src_row, ok, dst, ds_dst,
                           has_ds_cols, hidden, ds_cols, 4, HAS_DS, MAIN_BLOCKS, DS_BLOCKS, BLOCK_H,
                           EMULATE_BF16_RNE)
        elif FUSED:
            tok = tl.load(ids_ptr + out_rows * ids_stride, mask=ok, other=0).to(tl.int64)
            tok = tl.minimum(tl.maximum(tok, 0), vocab_size - 1)
            # text rows have no deepstack columns: has_ds_cols False writes zeros there
            _copy_source_rows(weight_ptr + tok * weight_stride, ok, dst, ds_dst, False, hidden,
                              ds_cols, HAS_DS, MAIN_BLOCKS, DS_BLOCKS, BLOCK_H, EMULATE_BF16_RNE)
        row = piece_end
