"""The tests' schedule strategies: ``mmassembler.testing``, the helpers engine developers use."""

from mmassembler.testing import DTYPES, Schedule, Step, encoded_rows, schedules  # noqa: F401
