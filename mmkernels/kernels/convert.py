"""Dtype conversion inside the kernels: one definition that every kernel module imports."""

import triton
import triton.language as tl


@triton.jit
def _f32_to_bf16_rne(x):
    """fp32 -> bf16, round to nearest even, NaN -> 0x7FC0, in integer ops.

    Used only under the Triton interpreter, whose own fp32 -> bf16 cast truncates.
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    half = tl.where(x != x, 0x7FC0, rounded & 0xFFFF)
    return half.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _bf16_to_f32_exact(x):
    """bf16 -> fp32 by moving the bits (exact, subnormals included).

    Used only under the Triton interpreter, whose own cast turns bf16 subnormals into
    wrong values (1e-39 -> 4.4e-39).
    """
    return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _convert(x, OUT_DTYPE: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr):
    """Convert a loaded block to the output dtype (a no-op when it already is).

    ``EMULATE_BF16_RNE`` (the interpreter) replaces its two inexact bf16 casts.
    """
    if x.dtype == OUT_DTYPE:
        y = x
    elif OUT_DTYPE == tl.bfloat16 and EMULATE_BF16_RNE:
        y = _f32_to_bf16_rne(x.to(tl.float32))
    elif x.dtype == tl.bfloat16 and EMULATE_BF16_RNE:
        y = _bf16_to_f32_exact(x).to(OUT_DTYPE)
    else:
        y = x.to(OUT_DTYPE)
    return y
