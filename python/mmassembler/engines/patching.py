"""Pointing an engine's functions at ours, wherever they are bound, and back.

``Patches.replace(owner, name, new)`` sets ``owner.name`` (a module or a class) and, for a
module-level function, every other module attribute that holds the same original object
(model files that did ``from ... import general_mm_embed_routine``); modules imported later
read the patched attribute of the defining module. ``restore()`` puts every original back
where it was replaced. An engine whose target is missing or has another signature than the
one our drop-in was written for is refused (``EngineVersionError``) before anything is
patched: patching blind could route a call we do not understand.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types

from mmassembler.errors import AssemblyError

logger = logging.getLogger("mmassembler")


class EngineVersionError(AssemblyError):
    """The engine's target is missing or not the one our drop-in replaces (another version)."""


def check_signature(fn, expected: tuple, where: str) -> None:
    """``fn``'s leading parameter names are ``expected``; ``EngineVersionError`` otherwise."""
    try:
        names = tuple(inspect.signature(fn).parameters)[:len(expected)]
    except (TypeError, ValueError):
        names = None
    if names != expected:
        raise EngineVersionError(f"{where} has parameters {names}, not {expected}: this engine version is not "
                                 "one mmassembler's drop-in was written for; nothing was patched")


def _module_attributes():
    """``(module, name, value)`` for every attribute of every loaded module."""
    for mod in list(sys.modules.values()):
        if not isinstance(mod, types.ModuleType):
            continue
        try:
            items = list(vars(mod).items())
        except TypeError:
            continue
        for attr, value in items:
            yield mod, attr, value


class Patches:
    """What one ``apply()`` replaced, for ``restore()``."""

    def __init__(self, label: str):
        self.label = label
        self.done: list = []  # (owner, name, original, new)

    def replace(self, owner, name: str, new, *, everywhere: bool = False) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, new)
        self.done.append((owner, name, original, new))
        where = [f"{getattr(owner, '__module__', '')}.{owner.__qualname__}" if isinstance(owner, type)
                 else owner.__name__]
        if everywhere:
            for mod, attr, value in _module_attributes():
                if value is original and mod is not owner:
                    setattr(mod, attr, new)
                    self.done.append((mod, attr, original, new))
                    where.append(mod.__name__)
        logger.info("%s: %s replaced in %s", self.label, name, ", ".join(where))

    def restore(self) -> None:
        """Put every original back where it was replaced (only where ours still is), and
        wherever a module imported since bound one of ours by name."""
        for owner, name, original, new in reversed(self.done):
            current = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
            if current is new:
                setattr(owner, name, original)
        swept = {id(new): original for owner, _, original, new in self.done if not isinstance(owner, type)}
        for mod, attr, value in _module_attributes():
            if id(value) in swept and callable(value) and hasattr(value, "__wrapped__"):
                setattr(mod, attr, swept[id(value)])
        logger.info("%s: %d replacements restored", self.label, len(self.done))
        self.done = []


class Switch:
    """An engine's on/off state: the ``Patches`` of the active ``apply()``, if any."""

    def __init__(self, label: str):
        self.label = label
        self.patches: Patches | None = None

    @property
    def on(self) -> bool:
        return self.patches is not None

    def begin(self) -> Patches:
        """Patches to fill (after every check has passed); the switch is on from here."""
        self.patches = Patches(self.label)
        return self.patches

    def end(self) -> bool:
        """Restore every original; False when nothing was applied."""
        if self.patches is None:
            return False
        self.patches.restore()
        self.patches = None
        return True
