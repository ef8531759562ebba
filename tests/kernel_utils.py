"""Helpers for kernel ≡ reference checks (the bitwise comparison is ``mmassembler.testing``'s)."""

from mmassembler.testing import assert_bitwise_equal  # noqa: F401  (the tests import it from here too)


def make_sources(specs, device, gen):
    """Tensors for (rows, width, dtype, strided) specs: random finite values."""
    from strategies import random_rows

    return [random_rows(rows, width, dtype, strided, gen, device) for rows, width, dtype, strided in specs]
