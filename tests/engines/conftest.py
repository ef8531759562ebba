"""Conformance tests run the engines' own code from their published wheels (see mmassembler/testing/engine_wheels.py).

Every test here is marked ``engines``. Without the wheels (no registry reachable) they
skip and say so; with them nothing is skipped.
"""

import pytest

from mmassembler.testing import engine_code, engine_wheels


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/engines/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.engines)


def engine(loader):
    """The loaded engine namespace, or a skip naming why the wheel is missing."""
    try:
        return loader()
    except engine_wheels.WheelUnavailable as exc:  # pragma: no cover - only without a registry
        pytest.skip(f"engine wheel unavailable: {exc}")


@pytest.fixture(scope="session")
def sg():
    return engine(engine_code.load_sglang)


@pytest.fixture(scope="session")
def vl():
    return engine(engine_code.load_vllm)
