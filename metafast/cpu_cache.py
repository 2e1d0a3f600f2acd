"""A caching CPU allocator around BatchedMAML's meta-step: torch's CUDA caching allocator, for the CPU.

A CNN meta-step allocates and frees the same multi-MB maps every step, and glibc hands large freed
blocks back to the kernel (heap trimming at an adaptive threshold, fresh mmaps above another), so each
step faults its maps' pages back in: Omniglot Conv4 with 32 tasks faulted 13-20k pages per step,
~15-25% of its time on 2 cores (bench/NOTES.md). Inside :func:`scope` the extension's block cache
(csrc/cpu_cache.cpp) is torch's CPU allocator: blocks of 256 KB and more come from, and go back
to, size-keyed free lists, so a step reuses the pages the step before faulted in. BatchedMAML's
exact-reverse meta-step (forward and backward) runs in one on the CPU.

Memory: the cache keeps what a step freed (at most :func:`set_limit` bytes, 1 GiB by default) until
the next step takes it; :func:`empty` returns it all. ``METAFAST_CPU_CACHE=0`` (or ``set_enabled(False)``)
turns the cache off. The first scope installs the cache as torch's CPU allocator for the rest of the process
(only over torch's default one; outside scopes it allocates and frees as that one does, except that torch's
memory profiler does not see its blocks); it needs metafast._C. Without either, scopes change nothing.
"""
import contextlib
import os
from typing import Dict, Iterator, Optional, Union

import torch

__all__ = ["scope", "empty", "stats", "set_limit", "set_enabled", "enabled", "available"]

ENV = "METAFAST_CPU_CACHE"
_STATS = ("cached_bytes", "cached_blocks", "live_blocks", "hits", "misses", "depth", "limit_bytes", "installed")
_override: Optional[bool] = None
_available: Optional[bool] = None


def available() -> bool:
    """Whether metafast._C with the block cache is loaded."""
    global _available
    if _available is None:
        try:
            import metafast._C  # noqa: F401  (registers the ops)
        except Exception:  # noqa: BLE001 - any failure means "no extension"
            pass
        _available = hasattr(torch.ops.metafast, "cpu_cache_enter")
    return _available


def set_enabled(on: Optional[bool]) -> None:
    """Turn the cache on or off for later scopes (None: back to ``METAFAST_CPU_CACHE``, default on)."""
    global _override
    if on is not None and not isinstance(on, bool):
        raise TypeError(f"on: expected a bool or None, got {type(on).__name__}")
    _override = on


def enabled() -> bool:
    if _override is not None:
        return _override
    raw = os.environ.get(ENV, "1").strip().lower()
    if raw in ("0", "false", "off", "no"):
        return False
    if raw in ("1", "true", "on", "yes", ""):
        return True
    raise ValueError(f"environment variable {ENV}: expected 0 or 1, got {raw!r}")


@contextlib.contextmanager
def scope(device: Union[str, torch.device] = "cpu") -> Iterator[bool]:
    """Run the body with the block cache as torch's CPU allocator (a no-op off the CPU, when disabled or
    unavailable, under another installed allocator, and while torch.compile traces). Yields whether the
    cache is active."""
    entered = (torch.device(device).type == "cpu" and not torch.compiler.is_compiling() and enabled()
               and available() and bool(torch.ops.metafast.cpu_cache_enter()))
    try:
        yield entered
    finally:
        if entered:
            torch.ops.metafast.cpu_cache_exit()


def empty() -> None:
    """Release every cached (free) block to the system."""
    if available():
        torch.ops.metafast.cpu_cache_empty()


def stats() -> Dict[str, int]:
    """cached_bytes / cached_blocks (free, kept for reuse), live_blocks (in use), hits / misses (requests of
    256 KB and more in scopes served from the cache / from the system), depth (open scopes), limit_bytes,
    installed (1 once a scope installed the cache)."""
    if not available():
        return {k: 0 for k in _STATS}
    return dict(zip(_STATS, torch.ops.metafast.cpu_cache_stats()))


def set_limit(limit_bytes: int) -> None:
    """At most this many freed bytes stay cached (beyond, blocks go back to the system); empties the cache."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"limit_bytes: expected an int >= 0, got {limit_bytes!r}")
    if available():
        torch.ops.metafast.cpu_cache_set_limit(limit_bytes)
