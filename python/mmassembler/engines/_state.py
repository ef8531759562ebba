"""Keeping our objects on the engine's objects between prefill chunks."""

from __future__ import annotations

from mmassembler.batch import Request

_REQUEST_ATTR = "_mmassembler_request"


def remember(obj, attr: str, value):
    """Attach ``value`` to ``obj`` when it takes attributes; return ``value`` either way."""
    try:
        setattr(obj, attr, value)
    except (AttributeError, TypeError):
        pass
    return value


def request_for(owner, items: list, prefix_len: int, extend_len: int) -> Request:
    """The owner's ``Request`` at this chunk: the last one advanced with ``with_window`` when
    its items are the same objects (so its planning index is reused), else a new one."""
    last = getattr(owner, _REQUEST_ATTR, None) if owner is not None else None
    if last is not None and len(last.items) == len(items) and all(
            a is b for a, b in zip(last.items, items)):
        req = last.with_window(prefix_len, extend_len)
    else:
        req = Request(items, prefix_len, extend_len)
    if owner is not None:
        remember(owner, _REQUEST_ATTR, req)
    return req
