"""glibc's allocator settings for a training process.

By default glibc returns large freed blocks to the OS (mmap for blocks over a threshold that adapts
to what the process frees, heap trimming above another), so a step that allocates the same
multi-MB temporaries every iteration can fault in 100-150 MB of fresh pages each time: a standalone
Omniglot Conv4 meta-step on 2 CPU cores took 232-266 ms that way against 124-176 ms with freed
memory kept (bench/NOTES.md). The library never changes this on import; ``metafast train``, which
owns its process, calls :func:`keep_freed_memory` unless ``--allocator default`` is given.
"""
import ctypes
import ctypes.util

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse instead of returning them to the OS (both thresholds:
    setting one alone stops glibc adapting the other, which is slower). False where this is not
    glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(_M_MMAP_THRESHOLD, 1 << 25))
