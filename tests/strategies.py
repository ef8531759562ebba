"""The tests' batch strategies: ``mmassembler.testing``, the helpers engine developers use."""

from mmassembler.testing import DTYPES, Batch, batches, random_rows, segment_tables  # noqa: F401
