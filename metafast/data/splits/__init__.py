"""The published class splits of the few-shot benchmarks (text files beside this module) and the
file checks every dataset loader shares: missing files, md5 sums, uniform error messages."""
import hashlib
import os
from typing import Iterable, List, Optional

SPLITS = ("train", "val", "test")
DATASETS = ("omniglot", "miniimagenet", "cifarfs", "fc100")
_HERE = os.path.dirname(os.path.abspath(__file__))


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing or incomplete under ``root``; the message says what to put where."""


class DatasetCorruptError(ValueError):
    """A dataset file exists but is damaged (wrong checksum, truncated, unexpected content)."""


def check_split(split: str, allowed: Iterable[str] = SPLITS) -> str:
    allowed = tuple(allowed)
    if split not in allowed:
        raise ValueError(f"split: expected one of {', '.join(map(repr, allowed))}, got {split!r}")
    return split


def load_split(dataset: str, split: str) -> List[str]:
    """Class names of ``split`` ('train' | 'val' | 'test') of ``dataset``, in file order."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}, got {dataset!r}")
    check_split(split)
    with open(os.path.join(_HERE, dataset, f"{split}.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def md5sum(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_md5(path: str, expected: Optional[str], how_to_fix: str) -> None:
    if expected is None:
        return
    got = md5sum(path)
    if got != expected:
        raise DatasetCorruptError(f"{path} is corrupt: md5 {got}, expected {expected} (a partial download or a "
                                  f"different file); {how_to_fix}")


def missing_error(name: str, root: str, missing: List[str], layout: str, how_to_get: str) -> DatasetNotFoundError:
    """An error listing (the first few) missing paths, the layout expected under root, and how to get it."""
    shown = "\n  ".join(missing[:8]) + (f"\n  ... and {len(missing) - 8} more" if len(missing) > 8 else "")
    return DatasetNotFoundError(f"{name}: files missing under root={root!r}:\n  {shown}\n"
                                f"expected layout:\n{layout}\n{how_to_get}")


def offline_error(name: str, root: str, exc: BaseException, how_to_get: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(f"{name}: download into {root!r} failed ({type(exc).__name__}: {exc}); "
                                f"no network? {how_to_get}")
