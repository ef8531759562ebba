"""Counting host work: Python calls and numpy operations made by a call (what tests count
instead of timing it).

``count_calls`` counts ``sys.setprofile`` events. ``count_numpy`` counts numpy operations
made by the library's own code (``mmassembler`` and ``mmkernels`` frames): calls into
numpy (functions, ufuncs and their methods, array methods) and operators on arrays
(arithmetic, comparisons, ``in``, fancy indexing, assignment of arrays or lists into an
array). A numpy operation on a tiny array costs microseconds of host time, so a step's
count is its fixed cost. Basic indexing (an int or a slice: a view or a scalar) is not
counted; numpy scalars in arithmetic are. Operators are read from the interpreter's
value stack while tracing opcodes, which needs CPython 3.11 or 3.12
(``numpy_counting_supported``).
"""

from __future__ import annotations

import ctypes
import dis
import sys

import numpy as np

__all__ = ["count_calls", "count_numpy", "numpy_counting_supported"]


def count_calls(fn, events=("call", "c_call")) -> int:
    """Function calls made by ``fn()``: ``sys.setprofile`` events of the given kinds
    (Python and C calls by default; ``("call",)`` for Python calls alone)."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event in events:
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def numpy_counting_supported() -> bool:
    """True where ``count_numpy`` can read operands (CPython 3.11 and 3.12 frame layouts)."""
    return sys.implementation.name == "cpython" and sys.version_info[:2] in ((3, 11), (3, 12))


_OPS = {name: dis.opmap[name] for name in ("BINARY_OP", "COMPARE_OP", "CONTAINS_OP", "BINARY_SUBSCR",
                                           "STORE_SUBSCR", "UNARY_INVERT", "UNARY_NEGATIVE")}
_DEPTH = {_OPS["BINARY_OP"]: 2, _OPS["COMPARE_OP"]: 2, _OPS["CONTAINS_OP"]: 2, _OPS["BINARY_SUBSCR"]: 2,
          _OPS["STORE_SUBSCR"]: 3, _OPS["UNARY_INVERT"]: 1, _OPS["UNARY_NEGATIVE"]: 1}
_CALL = dis.opmap["CALL"]
_NUMPY = (np.ndarray, np.generic)
_BASIC = (int, slice, type(Ellipsis), type(None), np.integer)
_OURS = ("/mmassembler/", "/mmkernels/")


def _stack(frame, k: int) -> list:
    """The top ``k`` values of ``frame``'s value stack (top first; ``None`` for NULL slots).

    CPython 3.11/3.12: a frame object points at its ``_PyInterpreterFrame`` (third word
    after the object header); that frame keeps its stack depth at byte 64 and its
    ``localsplus`` (locals, then the stack) from byte 72. Tracing saves the stack pointer
    there before each opcode event."""
    fp = ctypes.c_void_p.from_address(id(frame) + 24).value
    top = ctypes.c_int.from_address(fp + 64).value
    out = []
    for i in range(k):
        addr = ctypes.c_void_p.from_address(fp + 72 + 8 * (top - 1 - i)).value
        out.append(None if not addr else ctypes.cast(addr, ctypes.py_object).value)
    return out


def _basic_key(key) -> bool:
    if isinstance(key, tuple):
        return all(isinstance(k, _BASIC) for k in key)
    return isinstance(key, _BASIC)


def _numpy_callable(fn) -> bool:
    """A Python-level numpy function, a ufunc, or numpy's array-function dispatcher (calls
    the profiler does not report as C calls)."""
    if isinstance(fn, np.ufunc):
        return True
    module = getattr(fn, "__module__", None) or ""
    return module.startswith("numpy") and not type(fn).__name__.startswith("builtin")


def _numpy_builtin(fn) -> bool:
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, (np.ndarray, np.generic, np.ufunc)):
        return True
    module = getattr(fn, "__module__", None) or ""
    return module.startswith("numpy")


def count_numpy(fn, *, where=_OURS, log: list | None = None) -> int:
    """Numpy operations made by ``fn()`` in frames whose file path holds one of ``where``
    (see the module doc). ``log`` collects ``(file:line, what)`` per operation."""
    if not numpy_counting_supported():
        raise RuntimeError(f"count_numpy needs CPython 3.11 or 3.12, not {sys.version}")
    count = 0
    ours: dict = {}

    def mine(code) -> bool:
        found = ours.get(code)
        if found is None:
            found = ours[code] = any(w in code.co_filename for w in where)
        return found

    def note(frame, what):
        nonlocal count
        count += 1
        if log is not None:
            log.append((f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}", what))

    def opcode(frame, event, arg):
        if event != "opcode":
            return opcode
        op = frame.f_code.co_code[frame.f_lasti]
        depth = _DEPTH.get(op)
        if depth:
            vals = _stack(frame, depth)
            name = dis.opname[op]
            if op == _OPS["BINARY_SUBSCR"]:
                key, obj = vals
                hit = isinstance(obj, np.ndarray) and not _basic_key(key)
            elif op == _OPS["STORE_SUBSCR"]:
                key, obj, value = vals
                hit = isinstance(obj, np.ndarray) and not (_basic_key(key) and isinstance(value, (int, float, bool)))
            else:
                hit = any(isinstance(v, _NUMPY) for v in vals)
            if hit:
                note(frame, name)
        elif op == _CALL:
            argc = frame.f_code.co_code[frame.f_lasti + 1]
            vals = _stack(frame, argc + 2)
            fn = vals[argc + 1] if vals[argc + 1] is not None else vals[argc]
            if fn is not None and _numpy_callable(fn):
                note(frame, getattr(fn, "__name__", repr(fn)))
        return opcode

    def trace(frame, event, arg):
        if event == "call" and mine(frame.f_code):
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            return opcode
        return None

    def profile(frame, event, arg):
        if event == "c_call" and mine(frame.f_code) and _numpy_builtin(arg):
            note(frame, getattr(arg, "__qualname__", repr(arg)))

    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    return count
