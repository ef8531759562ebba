"""Conformance tests run the engines' own code from their published wheels (see wheels.py).

Every test here is marked ``engines``. Without the wheels (no registry reachable) they
skip and say so; with them nothing is skipped.
"""

import pytest

import wheels


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/engines/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.engines)


def engine(loader):
    """The loaded engine namespace, or a skip naming why the wheel is missing."""
    try:
        return loader()
    except wheels.WheelUnavailable as exc:  # pragma: no cover - only without a registry
        pytest.skip(f"engine wheel unavailable: {exc}")


@pytest.fixture(scope="session")
def sg():
    import sglang_real

    return engine(sglang_real.load)


@pytest.fixture(scope="session")
def vl():
    import vllm_real

    ns = engine(vllm_real.load)
    ns.runner.PIN_MEMORY = False  # what vLLM itself has on a machine without CUDA
    return ns
