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
def _compilable_kernel(module: str = "assemble", name: str = "_assemble_kernel"):
    """A kernel of ``mmkernels.kernels.<module>`` as a JITFunction, even where the package's
    copy is interpreted.

    Tests set ``TRITON_INTERPRET=1`` before import; compiling needs the compiled form, so
    the kernel file is loaded again, under another module name, with the interpreter off.
    """

    import triton

    mod = importlib.import_module(f"mmkernels.kernels.{module}")
    if isinstance(getattr(mod, name), triton.runtime.JITFunction):
        return getattr(mod, name)
    previous = triton.knobs.runtime.interpret
    triton.knobs.runtime.interpret = False
    helpers = "mmkernels.kernels.convert"  # imported by the kernel: built again, compiled
    saved = sys.modules.pop(helpers, None)
    try:
        spec = importlib.util.spec_from_file_location(f"mmkernels.kernels._{module}_aot", mod.__file__)
        module_obj = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module_obj
        spec.loader.exec_module(module_obj)
    finally:
        triton.knobs.runtime.interpret = previous
        if saved is not None:
            sys.modules[helpers] = saved
    return getattr(module_obj, name)


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


def step_kernel_configs() -> Iterator[tuple[int, int, int]]:
    """``(block_rows, block_cols, num_warps)`` of every GPU shape ``step_config`` can pick
    (every power-of-two width up to the column cap, widths that take one wide block, the
    tests' block_rows, and the halved
    rows ``StepOp.block_rows_for`` takes for small steps)."""
    from mmkernels.step import MAX_BLOCK_COLS, step_config

    widths = [1 << k for k in range(4, MAX_BLOCK_COLS.bit_length())] + [1536, 3584, 8192]
    seen = set()
    for width in widths:
        shapes = []
        for rows in (None, 1, 4, 64):
            cfg = step_config(width, interpreted=False, block_rows=rows)
            shapes.append((cfg.block_rows, cfg.block_cols, cfg.num_warps))
        default_rows, cols, warps = shapes[0]
        shapes += [(default_rows >> k, cols, warps) for k in range(1, default_rows.bit_length())]
        for key in shapes:
            if key not in seen:
                seen.add(key)
                yield key


def _step_signature(kernel, out_dtype: str, ids_dtype: str) -> dict:
    """The step kernel's signature, derived from its parameter list (pointers by name)."""
    pointers = {"out_ptr": out_dtype, "ds_ptr": out_dtype, "ids_ptr": ids_dtype,
                "weight_ptr": out_dtype, "f32_ptr": "fp32", "f16_ptr": "fp16", "bf16_ptr": "bf16",
                "runs_ptr": "i64", "step_ptr": "i64"}
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + pointers[p.name]
        else:
            sig[p.name] = "i32"
    return sig


def compile_step_variant(constexprs: dict, target, *, num_warps: int, out_dtype: str = "bf16",
                         ids_dtype: str = "i64"):
    """Compile ``_assemble_step_kernel`` for ``target`` with 16-byte-aligned pointers and
    widths divisible by 16 (what the launcher's specialisation sees for model widths)."""
    import triton
    from triton.compiler import ASTSource

    kernel = _compilable_kernel("step", "_assemble_step_kernel")
    sig = _step_signature(kernel, out_dtype, ids_dtype)
    aligned = [["tt.divisibility", 16]]
    names = list(sig)
    specialised = [n for n in names if n.endswith("_ptr") or n in ("weight_stride", "hidden", "ds_cols")]
    attrs = {(names.index(n),): aligned for n in specialised}
    src = ASTSource(fn=kernel, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps})
