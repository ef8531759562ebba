"""The scripts in ``examples/`` run as a user runs them (the engine guides need the
engines' wheels, like the conformance tests)."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_qwen2_vl_prefilled_in_chunks_matches_the_model_merge(capsys):
    pytest.importorskip("transformers")
    runpy.run_path(str(EXAMPLES / "qwen2_vl_chunked.py"), run_name="__main__")
    assert "match Qwen2-VL's own merge" in capsys.readouterr().out


@pytest.mark.engines
@pytest.mark.parametrize("script", ["sglang_guide.py", "vllm_guide.py"])
def test_engine_guides_run_against_the_engines_classes(script, capsys):
    from mmassembler.testing import engine_wheels

    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    except engine_wheels.WheelUnavailable as exc:  # pragma: no cover - only without a registry
        pytest.skip(f"engine wheel unavailable: {exc}")
    assert "bit for bit" in capsys.readouterr().out
