"""The step kernel compiles for sm_90, sm_80 and gfx942 at every block shape the heuristic
can pick (Triton 3.6 rejected some shapes of a prototype), with 16-byte global loads.

Grid-reduction rationale: every shape in fused mode with deepstack (all code paths) for
sm_90; every shape for sm_80 and gfx942, in one of the two mode/deepstack corners
(alternating, so each corner meets many shapes on each target); the vector-load checks on
the default 16 x 1024 shape. The default run compiles one shape per target (the one the
heuristic picks at hidden 4096); the whole grid is marked ``slow`` (minutes of CPU), and
``.ci/run`` runs it after the default suite.
"""

import re

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from mmkernels.aot import compile_step_variant, step_kernel_configs  # noqa: E402
from mmkernels.step_op import StepConfig  # noqa: E402

CONFIGS = list(step_kernel_configs())
_DEFAULT = next((c for c in CONFIGS if c[:2] == (4, 1024)), CONFIGS[0])  # step_config(4096)
CUDA90, CUDA80, GFX942 = GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32), GPUTarget("hip", "gfx942", 64)


def _constexprs(rows, cols, fused=True, ds=True, hidden=8192, unit=8):
    return dict(FUSED=fused, HAS_DS=ds, MAIN_BLOCKS=-(-hidden // cols), DS_BLOCKS=-(-2 * hidden // cols),
                BLOCK_R=rows, BLOCK_H=cols, OUT_UNIT=unit, SEARCH_W=StepConfig(1, 1, 1).search_keys,
                EMULATE_BF16_RNE=False)


def _cid(c):
    return f"r{c[0]}-c{c[1]}-w{c[2]}"


def _grid(values, default, ids):
    """``values`` as parameters, all but ``default`` marked slow."""
    return [pytest.param(v, id=i, marks=() if v == default else pytest.mark.slow) for v, i in zip(values, ids)]


@pytest.mark.parametrize("config", _grid(CONFIGS, _DEFAULT, [_cid(c) for c in CONFIGS]))
def test_every_shape_compiles_for_sm90(config):
    rows, cols, warps = config
    ptx = compile_step_variant(_constexprs(rows, cols), CUDA90, num_warps=warps).asm["ptx"]
    assert "st.global" in ptx


@pytest.mark.parametrize("k", _grid(range(len(CONFIGS)), CONFIGS.index(_DEFAULT), [_cid(c) for c in CONFIGS]))
@pytest.mark.parametrize("target", [CUDA80, GFX942], ids=["sm80", "gfx942"])
def test_every_shape_compiles_for_other_targets(k, target):
    rows, cols, warps = CONFIGS[k]
    fused, ds = (True, False) if k % 2 == 0 else (False, True)
    compiled = compile_step_variant(_constexprs(rows, cols, fused, ds), target, num_warps=warps)
    assert compiled.asm.get("cubin") or compiled.asm.get("hsaco")


@pytest.mark.parametrize("out_dtype,unit", [("bf16", 8), pytest.param("fp16", 8, marks=pytest.mark.slow),
                                            pytest.param("fp32", 4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("rows,cols,hidden", [(16, 1024, 8192), pytest.param(2, 4096, 3584, marks=pytest.mark.slow)],
                         ids=["16x1024", "2x4096"])
def test_aligned_sources_load_and_store_16_bytes_on_sm90(out_dtype, unit, rows, cols, hidden):
    ptx = compile_step_variant(_constexprs(rows, cols, hidden=hidden, unit=unit), CUDA90, num_warps=8,
                               out_dtype=out_dtype).asm["ptx"]
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx)
    assert re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx)


def test_aligned_sources_load_16_bytes_on_gfx942():
    asm = compile_step_variant(_constexprs(16, 1024), GFX942, num_warps=8).asm["amdgcn"]
    assert re.search(r"global_load_dwordx4", asm)
    assert re.search(r"global_store_dwordx4", asm)
