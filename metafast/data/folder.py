"""A user's own images as few-shot splits: an ImageFolder layout, one sub-folder per class.

Two layouts under ``root``:

    root/<class>/<image>                       classes split into train/val/test by a seed
    root/train/<class>/<image>, root/val/..., root/test/...   the split is given by the folders

An image is any file ending in .png .jpg .jpeg .bmp .gif .webp .tif .tiff (case-insensitive); other
files and hidden entries are ignored. Every image is decoded with Pillow, converted to ``channels``
(1: grayscale, 3: RGB) and resized to ``image_size`` x ``image_size`` (bilinear, antialiased; the
aspect ratio is not kept, as in the usual miniImageNet pipeline). Without split folders the classes
(sorted by name) are permuted by ``split_seed`` and cut into train/val/test by ``fractions``
(default 64/16/20%, CIFAR-FS's proportions), so a seed gives the same split on every machine.

Decoding is the slow part: the decoded split is cached as a .pt file in ``root`` (atomically
written) and reused while every image file keeps its size and modification time.

Bad input fails with the path in the message: an empty folder, a class folder without images, an
unreadable image, and (given ``min_classes`` / ``min_images``) too few classes for the ways or too
few images in a class for shots + queries.
"""
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .episodes import ImageSplit
from .splits import DatasetCorruptError, DatasetNotFoundError, check_split

__all__ = ["FolderDataset", "FolderCacheWarning", "IMAGE_EXTENSIONS", "DEFAULT_FRACTIONS", "find_layout",
           "split_classes", "channel_stats"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)
CACHE_VERSION = 1
_LAYOUT = ("  <root>/<class>/<image>.png|jpg|...            (classes split by a seed)\n"
           "  <root>/train|val|test/<class>/<image>.png|jpg|...  (the split given by folders)")


class FolderCacheWarning(UserWarning):
    """The decoded split could not be cached (e.g. a read-only root); it is decoded again next time."""


def _visible_dirs(path: str) -> List[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _images_in(path: str) -> List[str]:
    return sorted(e.name for e in os.scandir(path)
                  if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS))


def find_layout(root: str) -> Tuple[str, Dict[str, str]]:
    """("folders", {split: dir}) when root holds train/ (and val/, test/) folders of classes, else
    ("seeded", {}) for a flat folder of classes. Raises DatasetNotFoundError for a missing or empty root."""
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"folder dataset: root={root!r} is not a directory; expected layout:\n{_LAYOUT}")
    subdirs = _visible_dirs(root)
    if not subdirs:
        raise DatasetNotFoundError(f"folder dataset: {root!r} is empty (no class folders); expected layout:\n{_LAYOUT}")
    present = [s for s in SPLITS if s in subdirs]
    if present:
        return "folders", {s: os.path.join(root, s) for s in present}
    return "seeded", {}


def split_classes(classes: Sequence[str], split: str, seed: int = 0,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> List[str]:
    """The classes of ``split`` when ``classes`` are cut into train/val/test by ``seed``: sorted,
    permuted by a seeded generator, then the first fractions[0] (rounded) are train, the next
    fractions[1] val, the rest test; each split gets at least one class."""
    check_split(split, SPLITS)
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions: expected three positive numbers (train, val, test) summing to 1, got {fractions}")
    names = sorted(classes)
    n = len(names)
    if n < 3:
        raise ValueError(f"split_classes: {n} classes cannot be split into train, val and test (need >= 3)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    n_train = min(max(1, round(fractions[0] * n)), n - 2)
    n_val = min(max(1, round(fractions[1] * n)), n - n_train - 1)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}[split]
    return sorted(names[i] for i in order[bounds[0]:bounds[1]])


def _decode(path: str, channels: int, size: int) -> torch.Tensor:
    """One image as uint8 [channels, size, size]."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"folder dataset: decoding images needs Pillow ({e}); pip install pillow") from None
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)  # Pillow's resize antialiases when shrinking
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise DatasetCorruptError(f"folder dataset: cannot read image {path} ({type(e).__name__}: {e}); "
                                  "remove or replace it") from None
    return data.view(size, size, channels).permute(2, 0, 1).contiguous()


def _signature(files: List[str]) -> List[Tuple[str, int, int]]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append((f, st.st_size, st.st_mtime_ns))
    return out


class FolderDataset(ImageSplit):
    """One split of an ImageFolder-style dataset as uint8 [N, channels, image_size, image_size].

    Args:
        root: the folder (see the module docstring for the two layouts).
        split: 'train', 'val' or 'test'.
        image_size: side of the square images (default 84, miniImageNet's).
        channels: 1 (grayscale) or 3 (RGB, default).
        split_seed: the seed that splits the classes when there are no split folders.
        fractions: train/val/test shares of the classes for the seeded split.
        cache: read/write the decoded split in ``root`` (cache-folder-<split>-...pt).
        min_classes: fail naming the path when the split has fewer classes (e.g. the ways).
        min_images: fail naming the class folder when a class has fewer images (e.g. shots + queries).
    """

    def __init__(self, root: str, split: str = "train", image_size: int = 84, channels: int = 3, split_seed: int = 0,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, cache: bool = True, min_classes: int = 1,
                 min_images: int = 1):
        check_split(split, SPLITS)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: expected an int >= 1, got {image_size!r}")
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"channels: expected 1 (grayscale) or 3 (RGB), got {channels!r}")
        root = os.path.abspath(os.path.expanduser(str(root)))
        layout, dirs = find_layout(root)
        if layout == "folders":
            if split not in dirs:
                raise DatasetNotFoundError(f"folder dataset: {root!r} has split folders ({', '.join(dirs)}) but no "
                                           f"{split}/; add {os.path.join(root, split)} or use a flat folder of classes")
            base = dirs[split]
            classes = _visible_dirs(base)
            if not classes:
                raise DatasetNotFoundError(f"folder dataset: {base!r} is empty (no class folders); expected layout:\n"
                                           f"{_LAYOUT}")
            where = base
        else:
            base = root
            all_classes = _visible_dirs(root)
            if len(all_classes) < 3:
                raise ValueError(f"folder dataset: {root!r} has {len(all_classes)} class folder(s); a seeded "
                                 "train/val/test split needs at least 3 (or give train/ val/ test/ folders)")
            classes = split_classes(all_classes, split, split_seed, fractions)
            where = f"{root} (seeded split {split_seed})"
        if len(classes) < min_classes:
            raise ValueError(f"folder dataset: {where}: the {split} split has {len(classes)} classes, fewer than the "
                             f"{min_classes} a task needs (--ways); add classes"
                             + ("" if layout == "folders" else " or change the split fractions"))
        files: List[List[str]] = []
        for c in classes:
            d = os.path.join(base, c)
            names = _images_in(d)
            if not names:
                raise DatasetNotFoundError(f"folder dataset: class folder {d!r} holds no images "
                                           f"({', '.join(IMAGE_EXTENSIONS)})")
            if len(names) < min_images:
                raise ValueError(f"folder dataset: class folder {d!r} has {len(names)} images, fewer than the "
                                 f"{min_images} an episode draws from it (shots + queries)")
            files.append([os.path.join(d, n) for n in names])

        flat = [f for fs in files for f in fs]
        tag = f"{split}-{channels}x{image_size}" + ("" if layout == "folders" else f"-seed{split_seed}")
        cache_path = os.path.join(root, f"cache-folder-{tag}.pt")
        key = {"version": CACHE_VERSION, "classes": classes, "files": _signature(flat),
               "fractions": [float(f) for f in fractions]}
        images = self._read_cache(cache_path, key) if cache else None
        if images is None:
            images = torch.empty(len(flat), channels, image_size, image_size, dtype=torch.uint8)
            for i, f in enumerate(flat):
                images[i] = _decode(f, channels, image_size)
            if cache:
                self._write_cache(cache_path, key, images)
        labels = torch.cat([torch.full((len(fs),), c, dtype=torch.int64) for c, fs in enumerate(files)])
        super().__init__(images, labels, classes, name=f"folder {where} [{split}]")
        self.root = root
        self.split = split
        self.layout = layout
        self.cache_path = cache_path if cache else None

    @staticmethod
    def _read_cache(path: str, key: dict) -> Optional[torch.Tensor]:
        if not os.path.isfile(path):
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt from the images
            return None
        if not isinstance(state, dict) or state.get("key") != key:
            return None  # images added, removed or changed since: decode again
        return state.get("images")

    @staticmethod
    def _write_cache(path: str, key: dict, images: torch.Tensor) -> None:
        from ..runtime.checkpoint import atomic_write

        try:
            atomic_write(path, lambda f: torch.save({"key": key, "images": images}, f))
        except OSError as e:
            warnings.warn(f"folder dataset: cannot write the cache {path} ({e}); the images are decoded again "
                          "next time", FolderCacheWarning, stacklevel=3)


def channel_stats(split: ImageSplit) -> Tuple[List[float], List[float]]:
    """Per-channel mean and std of a split's pixels scaled to [0, 1] (for normalisation)."""
    x = split.images.to(torch.float64).div_(255.0)
    dims = (0, 2, 3)
    std = x.std(dim=dims)
    return x.mean(dim=dims).tolist(), [max(s, 1e-6) for s in std.tolist()]
