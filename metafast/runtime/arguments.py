"""argparse value types shared by the ``metafast`` subcommands (errors name what was expected)."""
import argparse
import math
from typing import Callable


def _checked(text: str, convert: Callable[[str], object], expected: str, ok: Callable[[object], bool]):
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    return lambda text: _checked(text, int, f"an integer >= {minimum}", lambda v: v >= minimum)


def positive_float(text: str) -> float:
    return _checked(text, float, "a positive finite number", lambda v: math.isfinite(v) and v > 0)


def non_negative_float(text: str) -> float:
    return _checked(text, float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
