"""Test set-up: interpreter on CPU-only machines, hypothesis profiles, device fixture.

``TRITON_INTERPRET`` is read when ``@triton.jit`` runs, so it is set here, before any test
module imports mmkernels. On a GPU machine the same tests run compiled Triton on CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=60, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=30, **_COMMON)
settings.register_profile("gpu", max_examples=200, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("gpu-10k", max_examples=1000, derandomize=True, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser):
    parser.addoption("--device", default=None, help="cpu or cuda (default: cuda when available)")


@pytest.fixture(scope="session")
def device(request) -> str:
    """Where kernel tests run: CUDA when present, else the CPU through the interpreter."""
    return request.config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed_and_restore():
    """Seed the RNG, empty the SGLang adapter's process-wide cache (tests reuse item hashes
    for other contents) and restore torch's default dtype after each test."""
    from mmassembler.engines import sglang

    if sglang._default_cache is not None:
        sglang._default_cache.clear()
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
