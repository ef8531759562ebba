"""Ahead-of-time compile checks: build kernel variants for a GPU target with no GPU present.

The triton wheel carries its compiler, so CI on a CPU machine catches type and IR
errors that the interpreter misses (it is looser than the compiler).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Iterator


@functools.lru_cache(maxsize=None)
def _compilable_kernel(module: str = "step", name: str = "_assemble_step_kernel"):
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


def step_kernel_configs() -> Iterator[tuple[int, int, int]]:
    """``(block_rows, block_cols, num_warps)`` of every GPU shape ``step_config`` can pick
    (every power-of-two width up to the column cap, widths that take one wide block, the
    tests' block_rows, and the halved
    rows ``StepOp.block_rows_for`` takes for small steps)."""
    from mmkernels.step_op import MAX_BLOCK_COLS, step_config

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
