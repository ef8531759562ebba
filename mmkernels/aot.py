"""Ahead-of-time compile checks: build kernel variants for a GPU target with no GPU present.

The triton wheel carries its compiler, so CI on a CPU machine catches type and IR
errors that the interpreter misses (it is looser than the compiler).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import sys
from collections.abc import Iterator


def kernel_variants() -> Iterator[dict]:
    """Constexpr sets covering every branch: text segments or not, deepstack, each source dtype."""
    for text, ds, (f32, f16, bf16), aligned in itertools.product(
        (True, False), (False, True), ((True, False, False), (False, True, False),
                                   (False, False, True), (True, True, True)), (True, False)
    ):
        yield dict(HAS_DS=ds, BLOCK_R=8, BLOCK_H=1024, SEARCH_STEPS=8, HAS_TEXT=text,
                   HAS_F32=f32, HAS_F16=f16, HAS_BF16=bf16, ALIGNED=aligned,
                   EMULATE_BF16_RNE=False, COUNTS_ON_DEVICE=False)
    for text, ds in itertools.product((True, False), (False, True)):  # CUDA-graph mode
        yield dict(HAS_DS=ds, BLOCK_R=8, BLOCK_H=1024, SEARCH_STEPS=12, HAS_TEXT=text,
                   HAS_F32=True, HAS_F16=True, HAS_BF16=True, ALIGNED=False,
                   EMULATE_BF16_RNE=False, COUNTS_ON_DEVICE=True)


@functools.lru_cache(maxsize=None)
def _compilable_kernel():
    """``_assemble_kernel`` as a JITFunction, even where the package's copy is interpreted.

    Tests set ``TRITON_INTERPRET=1`` before import; compiling needs the compiled form, so
    the kernel file is loaded again, under another module name, with the interpreter off.
    """
    import triton

    from mmkernels.kernels import assemble

    if isinstance(assemble._assemble_kernel, triton.runtime.JITFunction):
        return assemble._assemble_kernel
    previous = triton.knobs.runtime.interpret
    triton.knobs.runtime.interpret = False
    try:
        spec = importlib.util.spec_from_file_location("mmkernels.kernels._assemble_aot",
                                                      assemble.__file__)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        triton.knobs.runtime.interpret = previous
    return module._assemble_kernel


def compile_variant(constexprs: dict, target, out_dtype: str = "bf16"):
    """Compile ``_assemble_kernel`` for ``target`` (a ``triton.backends.compiler.GPUTarget``)."""
    import triton
    from triton.compiler import ASTSource

    _assemble_kernel = _compilable_kernel()
    sig = {
        "out_ptr": f"*{out_dtype}", "out_row_stride": "i64", "ds_ptr": f"*{out_dtype}",
        "ds_row_stride": "i64", "ids_ptr": "*i64", "weight_ptr": f"*{out_dtype}",
        "weight_row_stride": "i64", "vocab_size": "i64",
        "f32_ptr": "*fp32", "f16_ptr": "*fp16", "bf16_ptr": "*bf16", "meta_ptr": "*i64",
        "num_segments": "i32", "meta_stride": "i32", "counts_ptr": "*i64",
        "hidden": "i32", "ds_cols": "i32", "main_col_blocks": "i32",
    }
    sig.update({name: "constexpr" for name in constexprs})
    # What the launcher's specialisation sees for aligned buffers with hidden % 16 == 0.
    aligned = [["tt.divisibility", 16]]
    # hidden (15) and ds_cols (16) divisible by 16, as for every model width in use
    attrs = {(i,): aligned for i in (0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 14, 15, 16)}
    src = ASTSource(fn=_assemble_kernel, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(src, target=target)
