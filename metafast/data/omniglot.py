"""Omniglot (Lake et al. 2015) as few-shot splits, read from torchvision's on-disk layout.

``root/omniglot-py/images_background/<alphabet>/<characterNN>/*.png`` and the same under
``images_evaluation`` (the two zips of github.com/brendenlake/omniglot, which is what
torchvision.datasets.Omniglot downloads). Splits are the published Vinyals et al. 2016 lists
(train 1028 + val 172 characters = the usual 1200 meta-training characters, test 423); 'trainval'
is their union. Each character is 20 drawings, resized to 28x28 and inverted (strokes 1,
background 0). With ``rotations`` (default), the 90/180/270-degree rotations of every character are
extra classes, so a split of c characters has 4c classes.

Decoding the 105x105 PNGs is the slow part; the decoded split is cached as a .pt file beside the
images (atomically written) and reused when present.
"""
import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .episodes import ImageSplit
from .splits import (DatasetCorruptError, check_split, load_split, missing_error, offline_error)

FOLDER = "omniglot-py"
PARTS = ("images_background", "images_evaluation")
DRAWINGS = 20
IMAGE_SIZE = 28
ROTATIONS = (0, 90, 180, 270)
SPLITS = ("train", "val", "test", "trainval")
_LAYOUT = (f"  <root>/{FOLDER}/images_background/<Alphabet>/characterNN/NNNN_NN.png   ({DRAWINGS} per character)\n"
           f"  <root>/{FOLDER}/images_evaluation/<Alphabet>/characterNN/NNNN_NN.png")
_HOW = ("Download images_background.zip and images_evaluation.zip from "
        "https://github.com/brendenlake/omniglot/tree/master/python and unzip both into <root>/omniglot-py/, "
        "or pass download=True on a machine with network access (uses torchvision's downloader).")


def split_characters(split: str) -> List[str]:
    """Character folders of a split, relative to omniglot-py/ (e.g. 'images_background/Latin/character01')."""
    check_split(split, SPLITS)
    if split == "trainval":
        return load_split("omniglot", "train") + load_split("omniglot", "val")
    return load_split("omniglot", split)


def _base(root: str) -> str:
    root = os.path.expanduser(root)
    return root if os.path.basename(os.path.normpath(root)) == FOLDER else os.path.join(root, FOLDER)


def fetch(root: str) -> None:
    """Fetch and unzip both halves with torchvision's downloader (md5-checked)."""
    try:
        from torchvision.datasets import Omniglot as TVOmniglot
        from torchvision.datasets.utils import download_and_extract_archive
    except ImportError as e:
        raise ImportError(f"Omniglot download=True needs torchvision ({e}); {_HOW}") from None
    base = _base(root)
    for part in PARTS:
        if os.path.isdir(os.path.join(base, part)):
            continue
        try:
            download_and_extract_archive(f"{TVOmniglot.download_url_prefix}/{part}.zip", base,
                                         filename=f"{part}.zip", md5=TVOmniglot.zips_md5[part])
        except Exception as e:  # noqa: BLE001 - URLError, socket errors, md5 mismatch: all mean "not here"
            raise offline_error("Omniglot", root, e, _HOW) from None


def _decode(path: str, size: int) -> torch.Tensor:
    """One drawing as uint8 [size, size], strokes 255 on 0."""
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file
    except ImportError as e:
        raise ImportError(f"Omniglot: decoding the PNGs needs torchvision ({e}); pip install torchvision") from None

    try:
        img = decode_image(read_file(path), mode=ImageReadMode.GRAY)  # [1, 105, 105], strokes dark
    except RuntimeError as e:
        raise DatasetCorruptError(f"Omniglot: cannot decode {path} ({e}); re-extract the zip it came from") from None
    x = (255 - img.float()).unsqueeze(0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0, 0]


def _load_characters(base: str, chars: List[str], size: int) -> torch.Tensor:
    """uint8 [len(chars), DRAWINGS, size, size]; checks every folder before decoding anything."""
    missing, files = [], []
    for c in chars:
        d = os.path.join(base, c)
        pngs = sorted(f for f in os.listdir(d) if f.endswith(".png")) if os.path.isdir(d) else []
        if len(pngs) != DRAWINGS:
            missing.append(f"{d}/ ({len(pngs)} of {DRAWINGS} PNGs)" if pngs else f"{d}/")
        files.append([os.path.join(d, f) for f in pngs])
    if missing:
        raise missing_error("Omniglot", base, missing, _LAYOUT, _HOW)
    out = torch.empty(len(chars), DRAWINGS, size, size, dtype=torch.uint8)
    for i, fs in enumerate(files):
        for j, f in enumerate(fs):
            out[i, j] = _decode(f, size)
    return out


class Omniglot(ImageSplit):
    """A split of Omniglot as one uint8 tensor [N, 1, 28, 28].

    Args:
        root: the folder holding omniglot-py/ (or omniglot-py itself).
        split: 'train' (1028 characters), 'val' (172), 'test' (423) or 'trainval' (1200).
        rotations: add the 90/180/270-degree rotations of each character as classes (x4).
        image_size: side of the resized square images (28 in the MAML paper).
        download: fetch the zips with torchvision first when missing.
        cache: read/write the decoded split as <root>/omniglot-py/cache-<split>-<size>.pt.
        characters: character folders (relative to omniglot-py/) to use instead of the published
            split, for custom splits; ``split`` then only names the cache file.
    """

    def __init__(self, root: str, split: str = "train", rotations: bool = True, image_size: int = IMAGE_SIZE,
                 download: bool = False, cache: bool = True, characters: Optional[Sequence[str]] = None):
        if characters is None:
            chars = split_characters(split)
        else:
            chars = [str(c).strip("/") for c in characters]
            if not chars or len(set(chars)) != len(chars):
                raise ValueError("characters: expected a non-empty list of distinct character folders")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: expected an int >= 1, got {image_size!r}")
        base = _base(root)
        if download:
            fetch(root)
        cache_path = os.path.join(base, f"cache-{split}-{image_size}.pt")
        drawings = None
        if cache and os.path.isfile(cache_path):
            try:
                state = torch.load(cache_path, map_location="cpu", weights_only=True)
                if state.get("characters") == chars:
                    drawings = state["drawings"]
            except Exception:  # noqa: BLE001 - a stale or damaged cache is rebuilt from the PNGs
                drawings = None
        if drawings is None:
            drawings = _load_characters(base, chars, image_size)
            if cache:
                from ..runtime.checkpoint import atomic_write

                atomic_write(cache_path, lambda f: torch.save({"characters": chars, "drawings": drawings}, f))
        angles = ROTATIONS if rotations else (0,)
        # class index = character * len(angles) + rotation; rot90 counter-clockwise by k quarter turns
        images = torch.stack([torch.rot90(drawings, k=a // 90, dims=(2, 3)) for a in angles], dim=1)
        images = images.reshape(-1, 1, image_size, image_size)
        n = len(chars) * len(angles)
        labels = torch.arange(n).repeat_interleave(DRAWINGS)
        names = [f"{c}/rot{a:03d}" for c in chars for a in angles]
        super().__init__(images, labels, names, name=f"omniglot/{split}")
        self.split = split
        self.characters = chars
