"""Helpers for kernel ≡ reference checks: bitwise equality with a useful failure message."""

import torch

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str = "output") -> None:
    """Exact equality of bits (NaN payloads and -0.0 included); prints the first mismatches."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    a, b = got.cpu().view(_INT_VIEW[got.dtype]), want.cpu().view(_INT_VIEW[want.dtype])
    if not torch.equal(a, b):
        bad = (a != b).nonzero()[:5].tolist()
        detail = [(i, got[tuple(i)].item(), want[tuple(i)].item()) for i in bad]
        raise AssertionError(f"{what}: {(a != b).sum().item()} elements differ; first "
                             f"(index, got, want): {detail}")


def make_sources(specs, device, gen):
    """Tensors for (rows, width, dtype, strided) specs: random finite values."""
    from strategies import random_rows

    return [random_rows(rows, width, dtype, strided, gen, device) for rows, width, dtype, strided in specs]
