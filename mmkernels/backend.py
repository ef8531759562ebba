"""Backend choice: Triton on CUDA/ROCm, the Triton interpreter for CPU tensors, or torch.

The kernel module decides at import time whether ``@triton.jit`` builds compiled or
interpreted kernels (``TRITON_INTERPRET``), so the choice is read off the kernel object
and the tensors' device, never guessed. Interpreted kernels never see CUDA tensors:
the interpreter would dereference device addresses from the run table on the host.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
ENV_OVERRIDE = "MMKERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on these tensors on this machine."""


@functools.lru_cache(maxsize=None)
def _kernel_module(name: str = "step"):
    """Import the kernel module ``mmkernels.kernels.<name>`` once; ``None`` when triton is
    not installed or broken."""
    try:
        return importlib.import_module(f"mmkernels.kernels.{name}")
    except Exception as exc:  # noqa: BLE001 - any import failure means "no triton"
        logger.info("triton kernels unavailable: %s", exc)
        return None


def kernels_interpreted() -> bool:
    """True when the kernels were built by the Triton interpreter (``TRITON_INTERPRET=1``)."""
    mod = _kernel_module()
    if mod is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(mod._assemble_step_kernel, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _gpu_triton_reason() -> str | None:
    """``None`` when compiled Triton kernels can run on the current GPU, else why not."""
    if _kernel_module() is None:
        return "triton is not installed"
    if kernels_interpreted():
        return "the kernels were built for the Triton interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return "no CUDA/ROCm device is available to torch"
    try:
        import triton

        triton.runtime.driver.active.get_current_target()
    except Exception as exc:  # noqa: BLE001 - the driver reports failure in many ways
        return f"triton has no active GPU driver ({exc})"
    return None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Return the backend that runs for tensors on ``device``: triton, interpreter or torch.

    ``"auto"`` (overridable by the ``MMKERNELS_BACKEND`` environment variable) picks
    compiled Triton on a GPU and torch elsewhere, since the interpreter is far slower
    than torch on a CPU. ``"triton"`` means compiled Triton on a GPU, or the interpreter
    for CPU tensors when the kernels were built interpreted; otherwise it raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: expected one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        backend = os.environ.get(ENV_OVERRIDE, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"Invalid {ENV_OVERRIDE}: expected one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            if device.type == "cuda" and _gpu_triton_reason() is None:
                return "triton"
            return "torch"
    if backend == "torch":
        return "torch"
    if device.type == "cuda":
        reason = _gpu_triton_reason()
        if reason is None:
            return "triton"
        raise BackendUnavailableError(f"backend='triton' on {device}: {reason}")
    if device.type == "cpu" and kernels_interpreted():
        return "interpreter"
    raise BackendUnavailableError(
        f"backend='triton' on {device}: CPU tensors need TRITON_INTERPRET=1 set before "
        "mmkernels is imported (tests only); use backend='torch' or 'auto'"
    )
