"""The fused gather/scatter kernel that assembles an input-embedding buffer.

One launch covers a whole batch. The output is cut into *segments* of consecutive
rows that share one source: a multimodal source read in place through its base address
(no staging ``torch.cat``), or, in fused mode, the token-embedding table for a run of
text rows. Segments are cut into tiles of at most ``BLOCK_R`` rows; a program owns one
tile and one ``BLOCK_H`` column block, finds its segment by a scalar binary search over
the tiles' prefix sums, and so reads all its metadata as scalars.

Metadata table: int64, shape ``[NUM_FIELDS, num_segments]``, one column per segment,
sorted by ``TILE_START``; the field rows are named by the constants below.
"""

import triton
import triton.language as tl

from mmkernels.kernels.convert import _convert

# Field rows of the metadata table (the launcher in mmkernels/ops.py fills them); constexpr
# globals so the kernels can read them.
TILE_START = tl.constexpr(0)  # first tile of the segment (exclusive prefix sum of tiles)
OUT_ROW = tl.constexpr(1)  # first output row of the segment
ROWS = tl.constexpr(2)  # rows in the segment
SRC_OFF = tl.constexpr(3)  # first source row, in elements from the anchor of its dtype
SRC_STRIDE = tl.constexpr(4)  # source row stride, in elements
SRC_KIND = tl.constexpr(5)  # KIND_F32 / KIND_F16 / KIND_BF16 source, or KIND_TEXT
SRC_COLS = tl.constexpr(6)  # source columns (hidden, or hidden + deepstack columns)
NUM_FIELDS = tl.constexpr(7)

KIND_F32 = tl.constexpr(0)
KIND_F16 = tl.constexpr(1)
KIND_BF16 = tl.constexpr(2)
KIND_TEXT = tl.constexpr(3)  # fused mode: rows come from weight[clamp(input_ids)]


@triton.jit
def _copy_tile(dst, dst_rows_ok, anchor_ptr, src_off, src_stride, src_col, src_has_cols, r,
               col_ok, VEC: tl.constexpr, ALIGNED: tl.constexpr, OUT_DTYPE: tl.constexpr,
               EMULATE_BF16_RNE: tl.constexpr):
    """Copy a tile of rows from a source (converted on load) to ``dst``.

    The source is addressed as ``anchor_ptr + src_off``: a typed pointer argument keeps
    the alignment the compiler needs for 16-byte loads, which a raw address cast to a
    pointer loses. ``VEC`` elements make 16 bytes; with ``ALIGNED`` the offset and stride
    arrive divided by ``VEC``, so the multiplication proves their alignment to the compiler
    (a ``tl.multiple_of`` hint on a loaded scalar is not enough).
    """
    if ALIGNED:  # the table holds offset and stride in units of VEC elements
        ptr = anchor_ptr + src_off * VEC + r * (src_stride * VEC) + src_col
    else:
        ptr = anchor_ptr + src_off + r * src_stride + src_col
    # src_has_cols is a scalar: a per-column bound would stop 16-byte vector loads
    vals = tl.load(ptr, mask=dst_rows_ok & col_ok & src_has_cols, other=0.0)
    tl.store(dst, _convert(vals, OUT_DTYPE, EMULATE_BF16_RNE), mask=dst_rows_ok & col_ok)


# Batch-dependent ints are not specialised on value (== 1, % 16): each new combination
# would compile another variant mid-serving. Widths and strides keep it (16-byte access).
@triton.jit(do_not_specialize=["vocab_size", "num_segments", "meta_stride"])
def _assemble_kernel(
    out_ptr, out_row_stride,  # main output [num_out_rows, hidden]
    ds_ptr, ds_row_stride,  # deepstack output [num_out_rows, ds_cols]; out_ptr without one
    ids_ptr, weight_ptr, weight_row_stride, vocab_size,  # text segments (fused mode) only
    f32_ptr, f16_ptr, bf16_ptr,  # anchors: sources are read at anchor + SRC_OFF of their dtype
    meta_ptr, num_segments,  # metadata table [NUM_FIELDS, meta_stride], first num_segments used
    meta_stride,  # row stride of the table: num_segments, or a CUDA-graph buffer's capacity
    counts_ptr,  # COUNTS_ON_DEVICE: int64 [num_segments, num_tiles], read by the kernel
    hidden,  # runtime ints: Triton specialises them on divisibility by 16, which keeps
    ds_cols,  # 16-byte accesses without a recompile for every model width
    main_col_blocks,  # cdiv(hidden, BLOCK_H); later column blocks are deepstack
    HAS_DS: tl.constexpr,  # a deepstack buffer is written
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,  # >= ceil(log2(num_segments + 1)); extra steps are no-ops
    HAS_TEXT: tl.constexpr,  # constexpr so absent segment kinds are optimized out
    HAS_F32: tl.constexpr,
    HAS_F16: tl.constexpr,
    HAS_BF16: tl.constexpr,
    ALIGNED: tl.constexpr,  # every source row and column offset the kernel reads is 16-byte aligned
    EMULATE_BF16_RNE: tl.constexpr,  # interpreter only: its fp32 -> bf16 cast truncates
    COUNTS_ON_DEVICE: tl.constexpr = False,  # CUDA-graph mode: counts change between replays
):
    """Copy one tile of one segment into the output (and the deepstack buffer).

    For a segment ``(out_row o, rows n)`` and ``0 <= i < n``::

        out[o + i] = src[src_row + i, :hidden]                   (multimodal segment)
        out[o + i] = weight[clamp(ids[o + i], 0, vocab - 1)]     (text segment)
        ds[o + i]  = src[src_row + i, hidden:]   (zeros for text, or a source without them)

    Rows outside every segment are not touched (scatter mode).
    """
    OUT_DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    tile = tl.program_id(0)
    pid_c = tl.program_id(1)

    if COUNTS_ON_DEVICE:
        num_segments = tl.load(counts_ptr).to(tl.int32)
        num_tiles = tl.load(counts_ptr + 1)
    # Scalar binary search: seg = the last segment whose first tile is <= tile.
    lo = num_segments * 0
    hi = num_segments
    for _ in tl.static_range(SEARCH_STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        start = tl.load(meta_ptr + TILE_START * meta_stride + mid, mask=active, other=0)
        go_right = active & (start <= tile)
        hi = tl.where(active & (start > tile), mid, hi)
        lo = tl.where(go_right, mid + 1, lo)
    # convert it to int64 to avoid overflow: rows * stride exceeds 2**31 on large batches
    seg = tl.maximum(lo - 1, 0).to(tl.int64)

    first = (tile - tl.load(meta_ptr + TILE_START * meta_stride + seg)) * BLOCK_R
    n = tl.load(meta_ptr + ROWS * meta_stride + seg) - first
    if COUNTS_ON_DEVICE:  # programs past this batch's tiles write nothing
        n = tl.where(tile < num_tiles, n, 0)
    out_row = tl.load(meta_ptr + OUT_ROW * meta_stride + seg) + first
    kind = tl.load(meta_ptr + SRC_KIND * meta_stride + seg)
    src_stride = tl.load(meta_ptr + SRC_STRIDE * meta_stride + seg)
    src_off = tl.load(meta_ptr + SRC_OFF * meta_stride + seg)
    src_cols = tl.load(meta_ptr + SRC_COLS * meta_stride + seg)

    r = tl.arange(0, BLOCK_R).to(tl.int64)[:, None]
    rows_ok = r < n
    src_r = first + r
    if not HAS_DS:
        cols = (pid_c * BLOCK_H + tl.arange(0, BLOCK_H))[None, :]
        col_ok = cols < hidden
        src_col = cols
        dst = out_ptr + (out_row + r) * out_row_stride + cols
        text_col_ok = col_ok
        src_has_cols = True
    else:
        is_ds = pid_c >= main_col_blocks
        cols = (tl.where(is_ds, pid_c - main_col_blocks, pid_c) * BLOCK_H
                + tl.arange(0, BLOCK_H))[None, :]
        col_ok = cols < tl.where(is_ds, ds_cols, hidden)
        src_col = cols + tl.where(is_ds, hidden, 0)
        dst = tl.where(is_ds, ds_ptr + (out_row + r) * ds_row_stride + cols,
                       out_ptr + (out_row + r) * out_row_stride + cols)
        text_col_ok = col_ok & (pid_c < main_col_blocks)  # deepstack columns of text rows are zero
        src_has_cols = (pid_c < main_col_blocks) | (src_cols > hidden)  # else zeros

    if HAS_TEXT:
        if kind == KIND_TEXT:
            tok = tl.load(ids_ptr + out_row + r, mask=rows_ok, other=0).to(tl.int64)
            tok = tl.minimum(tl.maximum(tok, 0), vocab_size - 1)
            w = tl.load(weight_ptr + tok * weight_row_stride + cols, mask=rows_ok & text_col_ok,
                        other=0.0)
            tl.store(dst, _convert(w, OUT_DTYPE, EMULATE_BF16_RNE), mask=rows_ok & col_ok)
    if HAS_F32:
        if kind == KIND_F32:
            _copy_tile(dst, rows_ok, f32_ptr, src_off, src_stride, src_col, src_has_cols, src_r,
                       col_ok, 4, ALIGNED, OUT_DTYPE, EMULATE_BF16_RNE)
    if HAS_F16:
        if kind == KIND_F16:
            _copy_tile(dst, rows_ok, f16_ptr, src_off, src_stride, src_col, src_has_cols, src_r,
                       col_ok, 8, ALIGNED, OUT_DTYPE, EMULATE_BF16_RNE)
    if HAS_BF16:
        if kind == KIND_BF16:
            _copy_tile(dst, rows_ok, bf16_ptr, src_off, src_stride, src_col, src_has_cols, src_r,
                       col_ok, 8, ALIGNED, OUT_DTYPE, EMULATE_BF16_RNE)
