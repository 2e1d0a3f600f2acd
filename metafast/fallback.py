"""One named warning for every fallback, and strict mode (METAFAST_STRICT=1) that turns them into errors.

A fallback is metafast running something on another path than the one it would have taken: a backend
that cannot run, a fused kernel whose self-check failed, a missing or unloadable metafast._C, a module
the batched executor runs per task. Each is reported through :func:`fallback`, counted under a short
key (``counts()`` feeds ``describe()`` and ``metafast info``), and raises :class:`FallbackError` when
METAFAST_STRICT=1.
"""
import os
import threading
import warnings
from collections import Counter

STRICT_ENV = "METAFAST_STRICT"


class FallbackWarning(UserWarning):
    """metafast took a slower or less exact path than the one asked for or expected."""


class FallbackError(RuntimeError):
    """A fallback while METAFAST_STRICT=1."""


_counts: Counter = Counter()
_lock = threading.Lock()


def strict() -> bool:
    """Whether METAFAST_STRICT asks for fallbacks to raise (read on every call: tests flip it)."""
    return os.environ.get(STRICT_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def fallback(key: str, message: str, stacklevel: int = 2) -> None:
    """Count a fallback under ``key``; raise :class:`FallbackError` under METAFAST_STRICT=1, else warn
    with :class:`FallbackWarning` (``stacklevel`` as for ``warnings.warn``, counted from the caller)."""
    with _lock:
        _counts[key] += 1
    if strict():
        raise FallbackError(f"{message} ({STRICT_ENV}=1 makes every fallback an error)")
    warnings.warn(message, FallbackWarning, stacklevel=stacklevel + 1)


def counts() -> dict:
    """Fallbacks so far in this process, by key."""
    with _lock:
        return dict(_counts)
