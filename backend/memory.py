"""Memory of the server's long-lived processes (gunicorn workers, `vlm-al worker`): glibc heap, no triton.

A fit makes several transient (n_tasks, dim) float32 copies (the training rows, their normalised form, the pool's
features), and indexing decodes a chunk of images at a time. With glibc's defaults the threshold above which a block
is mmapped (and returned to the OS when freed) rises to the size of the largest block freed so far, up to 32 MB, so
from the first fit on those copies come from the heap and stay resident, and every thread may get an arena of its
own (up to 8 per core). Both make the resident size grow with the project and with the threads that ever ran.

The fixed part of a worker's resident size is mostly torch (measured at start-up with the default CUDA build of
torch 2.14 and a cached ONNX export, 1.24 GB in all): libtorch and the CUDA libraries it links (~400 MB of file
pages), torch._dynamo with sympy, which torchvision imports (timm needs torchvision), and triton (~100 MB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 16 << 20
"""Blocks of 16 MB or more (a fit's (n_tasks, dim) copies from about 3,000 tasks on) are mmapped and handed back
when freed; a fixed value also stops glibc raising it. Not lower: a training batch (~1 MB) mmapped and unmapped at
every step costs page faults and slowed /health during fits (p99 69 ms at 5k tasks with 1 MB)."""
ARENA_MAX = 2


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def bound_heap_growth() -> bool:
    """Large blocks mmapped (fixed threshold), at most ARENA_MAX arenas. False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    applied = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and libc.mallopt(M_ARENA_MAX, ARENA_MAX) == 1
    if not applied:
        logger.warning("glibc refused the heap settings (mallopt); resident memory may grow with the project")
    return applied


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (after a job whose transient arrays were freed)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_triton_out() -> bool:
    """Mark triton absent before torch loads: the server never compiles (no torch.compile; ONNX export uses the
    TorchScript exporter), but torchvision imports torch._dynamo, which loads triton's compiler library into every
    process (about 100 MB resident). torch treats a missing triton as "no compiler backend". False when triton was
    imported already."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is None
    sys.modules["triton"] = None  # type: ignore[assignment]  # the import system's "not importable" marker
    return True
