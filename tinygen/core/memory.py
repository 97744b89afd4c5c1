"""Giving freed memory back to the system, after a load's temporaries are gone."""

from __future__ import annotations

import ctypes


def return_freed_memory() -> None:
    """Building a model's kernels' forms, or a vocabulary's native tokenizer, frees tens of MB of
    temporaries, which glibc keeps in its heap for later: give them back, so that the process holds
    about what it uses. Elsewhere (no malloc_trim) nothing is done."""
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)
