"""Triton JIT kernels only: no torch logic, no validation (see ``mmkernels.ops``)."""
