"""Keep freed memory in the process (glibc malloc) instead of handing it back to the OS.

A training step or a beam-search step allocates tensors of a few MB to a few tens of MB and frees
them again within milliseconds. glibc serves allocations that large with fresh ``mmap`` regions
(or trims them off the heap when freed), so every step the kernel maps and zeroes the same
memory again: tens of thousands of page faults per COCO-size training step on the project's
2-core CPU. Serving them from the heap and keeping the freed heap (``mallopt``: mmap threshold
64 MiB, trim threshold 1 GiB) removes those faults (what that buys: docs/performance.md).
PyTorch's CPU performance guide reaches the same end by preloading jemalloc or tcmalloc; this
needs no extra library.

The cost: the heap keeps its high-water mark (up to 1 GiB free above it before it trims), which
a training process reaches at every step anyway. The scripts call :func:`keep_freed_memory` at
start; ``CAPTIONING_MALLOC=system`` leaves glibc's defaults alone. Nothing changes what is computed.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 1 << 30
applied = False  # set by keep_freed_memory; the benchmark records it


def keep_freed_memory() -> bool:
    """Apply the settings above; True if glibc took them, False elsewhere (macOS, musl, opt-out)."""
    global applied
    if os.environ.get("CAPTIONING_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return applied
