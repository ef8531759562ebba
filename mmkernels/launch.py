"""Launching a compiled Triton kernel without Triton's per-call dispatch.

``kernel[grid](...)`` binds and specialises every argument, builds a cache key and looks
the kernel up on each call (tens of microseconds). ``DirectLauncher`` lets the first call
of each specialisation go through it (compiling if needed), keeps the ``CompiledKernel``
it returns, and calls that kernel's launcher directly afterwards, with pointers as ints.
The caller's ``key`` must separate every argument property Triton specialises on that
can change between calls (pointer alignment, dtypes, int widths). ``CompiledKernel.run``
is an internal API: it is used only on Triton versions where its call shape is known,
never under the interpreter or when launch hooks are set.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

DIRECT_TRITON_VERSIONS = ("3.6.",)  # CompiledKernel.run(gx, gy, gz, stream, fn, meta, ...)


def direct_launch_supported() -> bool:
    """True when this Triton's ``CompiledKernel.run`` has the call shape used here."""
    import triton

    return triton.__version__.startswith(DIRECT_TRITON_VERSIONS)


def _hooked(hook) -> bool:
    """A launch hook is set: Triton 3.6 keeps hooks in a chain that is never ``None``."""
    return hook is not None and bool(getattr(hook, "calls", True))


class DirectLauncher:
    """Launch ``kernel`` directly once a call of the same ``key`` has compiled it."""

    def __init__(self, kernel, *, interpreted: bool):
        self.kernel = kernel
        self.direct = not interpreted and direct_launch_supported()
        self.compiled: dict = {}
        self.direct_launches = 0
        from triton import knobs

        self._runtime_knobs = knobs.runtime  # counted for tests: launches that skipped the dispatcher

    def launch_direct(self, key, grid: int, int_args: tuple, device_index: int) -> bool:
        """Launch the kernel compiled for ``key`` with every argument as an int (pointers
        as addresses, constexprs last); False when there is none or a hook is set."""
        entry = self.compiled.get(key)
        if entry is None:
            return False
        runtime = self._runtime_knobs
        if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
            return False
        call, head, _ = entry
        call(grid, 1, 1, torch._C._cuda_getCurrentRawStream(device_index), *head, *int_args)
        self.direct_launches += 1
        return True

    def launch(self, key, grid: int, args: tuple, constexprs: dict, num_warps: int) -> None:
        """Launch through Triton's dispatcher (compiling if needed); keep what it compiled."""
        result = self.kernel[(grid,)](*args, **constexprs, num_warps=num_warps)
        if self.direct and result is not None and not hasattr(result, "result"):
            self.compiled[key] = _direct_entry(result)


def _direct_entry(compiled, c_launch: bool = True) -> tuple:
    """``(callable, arguments between the stream and the kernel's, compiled kernel)``.

    Triton 3.6's ``CudaLauncher.__call__`` only allocates scratch buffers and forwards to
    its C ``launch``; a kernel that needs no scratch is launched through ``launch``
    itself (cooperative and PDL flags, no scratch), skipping that Python layer.
    """
    run = compiled.run
    meta = (compiled.packed_metadata, None, None, None)  # metadata, launch metadata, hooks
    if (c_launch and type(run).__name__ == "CudaLauncher" and callable(getattr(run, "launch", None))
            and getattr(run, "global_scratch_size", 1) == 0
            and getattr(run, "profile_scratch_size", 1) == 0):
        return run.launch, (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                            *meta), compiled
    return run, (compiled.function, *meta), compiled
