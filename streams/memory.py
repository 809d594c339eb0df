"""Giving freed memory back to the operating system, so that a long-running worker's RSS follows its live state.

Every batch allocates and frees large buffers (fetched message sets, event bodies, commit records).
glibc's malloc keeps what was freed in its heaps for reuse and returns it only from the top of a
heap, so after days of churn a worker's RSS creeps up while its live data stays the same.
`malloc_trim(0)` returns the free pages of every heap; it is cheap, and a no-op where glibc is not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Return the C heaps' free pages to the OS; whether anything was returned (False where unsupported)."""
    return bool(_TRIM(0)) if _TRIM is not None else False
