"""Our state about engine objects, kept beside them, never on them.

Engine objects pass their attributes on (SGLang's Transformers backend forwards a
``MultimodalDataItem``'s extra fields to ``get_image_features(**...)``), so nothing is
written onto them. ``ObjectState`` maps an object to a value by identity, holding only a
weak reference: the entry goes when the object does, and a later object that reuses the
address never sees it. Objects that cannot be weakly referenced get no state.
"""

from __future__ import annotations

import weakref

class ObjectState:
    """Identity-keyed, weakly held ``object -> value`` map."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}  # id -> (weak reference, value)

    def get(self, obj, default=None):
        entry = self._entries.get(id(obj))
        if entry is None or entry[0]() is not obj:
            return default
        return entry[1]

    def set(self, obj, value):
        """Remember ``value`` for ``obj`` (when it takes weak references); return ``value``."""
        try:
            ref = weakref.ref(obj, lambda _, key=id(obj), table=self._entries: table.pop(key, None))
        except TypeError:
            return value
        self._entries[id(obj)] = (ref, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)
