"""Freed memory goes back to the operating system (glibc's malloc_trim)."""

from __future__ import annotations

import platform

import pytest

from streams.memory import release_free_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_pages_are_returned() -> None:
    blocks = [bytearray(200_000) for _ in range(200)]  # 40 MB from malloc's heaps, then freed
    del blocks
    assert release_free_memory() is True
