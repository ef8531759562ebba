"""The scripts in ``examples/`` run as a user runs them (the engine guides need the
engines' wheels, like the conformance tests)."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_qwen2_vl_prefilled_in_chunks_matches_the_model_merge(capsys):
    pytest.importorskip("transformers")
    runpy.run_path(str(EXAMPLES / "qwen2_vl_chunked.py"), run_name="__main__")
    assert "match Qwen2-VL's own merge" in capsys.readouterr().out


@pytest.mark.engines
@pytest.mark.parametrize("script", ["sglang_guide.py", "vllm_guide.py"])
def test_engine_guides_run_as_documented(script, tmp_path):
    """``python examples/<guide>.py`` from a folder outside the repository, with nothing on
    the path but the installed project (the way the README runs it)."""
    from mmassembler.testing import engine_wheels

    try:  # fetched once here, so a missing registry skips instead of failing in the child
        engine_wheels.source("sglang==0.5.23" if script.startswith("sglang") else "vllm==0.33.0")
    except engine_wheels.WheelUnavailable as exc:  # pragma: no cover - only without a registry
        pytest.skip(f"engine wheel unavailable: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bit for bit" in done.stdout
