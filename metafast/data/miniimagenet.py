"""miniImageNet (Vinyals et al. 2016) with the Ravi & Larochelle 2017 split: 64/16/20 classes of
600 images, 84x84 RGB.

Two on-disk formats are read:
  1. the common pickles ``root/mini-imagenet-cache-{train,val,test}.pkl`` (the val one may be
     named ``...-validation.pkl``, as in the learn2learn release): a dict with
     ``image_data`` uint8 [N, 84, 84, 3] and ``class_dict`` {wnid: [row indices]};
  2. Ravi's CSVs + an image folder: ``root/{train,val,test}.csv`` (header ``filename,label``,
     rows like ``n0153282900000005.jpg,n01532829``) and ``root/images/<filename>`` (any size,
     resized to 84x84; decoding needs torchvision).
The classes found must be exactly the published split (checked), so a wrong or half-written file
is reported instead of silently giving a different benchmark.
"""
import csv
import os
import pickle
from typing import Dict, List

import torch
import torch.nn.functional as F

from .episodes import ImageSplit
from .splits import DatasetCorruptError, check_split, load_split, missing_error

IMAGE_SIZE = 84
IMAGES_PER_CLASS = 600
_LAYOUT = ("  <root>/mini-imagenet-cache-{train,val,test}.pkl        (pickles: image_data + class_dict;\n"
           "                                                         val may be named ...-validation.pkl)\n"
           "or\n"
           "  <root>/{train,val,test}.csv + <root>/images/*.jpg      (Ravi & Larochelle's CSVs: filename,label)")
_HOW = ("miniImageNet has no official downloader (torchvision has none either): get the pickles or the "
        "CSV split files and images (e.g. from the learn2learn or Ravi & Larochelle releases) and put them "
        "under root as shown.")


def pickle_path(root: str, split: str) -> str:
    """The split's pickle; the common release names the val file ...-validation.pkl, both are accepted."""
    root = os.path.expanduser(root)
    path = os.path.join(root, f"mini-imagenet-cache-{split}.pkl")
    if split == "val" and not os.path.isfile(path):
        alt = os.path.join(root, "mini-imagenet-cache-validation.pkl")
        if os.path.isfile(alt):
            return alt
    return path


def _from_pickle(path: str, wnids: List[str]):
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError) as e:
        raise DatasetCorruptError(f"miniImageNet: {path} is not a readable pickle ({type(e).__name__}: {e}); "
                                  "it is truncated or damaged - download it again") from None
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        raise DatasetCorruptError(f"miniImageNet: {path} should hold a dict with 'image_data' and 'class_dict'")
    images = torch.as_tensor(data["image_data"])
    class_dict: Dict[str, List[int]] = data["class_dict"]
    if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise DatasetCorruptError(f"miniImageNet: {path}: image_data should be uint8 [N, H, W, 3], got "
                                  f"{images.dtype} {tuple(images.shape)}")
    _check_classes(path, sorted(class_dict), wnids)
    rows, labels = [], []
    for c, w in enumerate(wnids):
        idx = torch.as_tensor(list(class_dict[w]), dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= images.shape[0]):
            raise DatasetCorruptError(f"miniImageNet: {path}: class_dict[{w!r}] indexes past the "
                                      f"{images.shape[0]} images (a truncated image_data?)")
        rows.append(idx)
        labels.append(torch.full((idx.numel(),), c, dtype=torch.int64))
    rows = torch.cat(rows)
    return images[rows].permute(0, 3, 1, 2).contiguous(), torch.cat(labels)


def _check_classes(path: str, found: List[str], wnids: List[str]) -> None:
    if sorted(found) != sorted(wnids):
        extra, lost = sorted(set(found) - set(wnids)), sorted(set(wnids) - set(found))
        raise DatasetCorruptError(f"miniImageNet: {path} does not hold the Ravi-Larochelle classes of this split "
                                  f"(missing {lost[:5]}{'...' if len(lost) > 5 else ''}, unexpected "
                                  f"{extra[:5]}{'...' if len(extra) > 5 else ''})")


def _from_csv(root: str, csv_path: str, wnids: List[str], size: int):
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file
    except ImportError as e:
        raise ImportError(f"miniImageNet: decoding the JPEG folder needs torchvision ({e}); pip install torchvision, "
                          "or use the pickle files") from None

    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows or [h.strip() for h in rows[0]] != ["filename", "label"]:
        raise DatasetCorruptError(f"miniImageNet: {csv_path} should start with the header 'filename,label'")
    rows = rows[1:]
    _check_classes(csv_path, sorted({r[1] for r in rows}), wnids)
    img_dir = os.path.join(root, "images")
    missing = [os.path.join(img_dir, r[0]) for r in rows if not os.path.isfile(os.path.join(img_dir, r[0]))]
    if missing:
        raise missing_error("miniImageNet", root, missing, _LAYOUT, _HOW)
    index = {w: c for c, w in enumerate(wnids)}
    images = torch.empty(len(rows), 3, size, size, dtype=torch.uint8)
    for i, (name, _) in enumerate(rows):
        path = os.path.join(img_dir, name)
        try:
            img = decode_image(read_file(path), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise DatasetCorruptError(f"miniImageNet: cannot decode {path} ({e})") from None
        if img.shape[-2:] != (size, size):
            img = F.interpolate(img.unsqueeze(0).float(), size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
        images[i] = img
    labels = torch.tensor([index[r[1]] for r in rows], dtype=torch.int64)
    return images, labels


class MiniImageNet(ImageSplit):
    """A split of miniImageNet as one uint8 tensor [N, 3, 84, 84] (labels index ``class_names``,
    the split's wnids in published order).

    Args:
        root: folder with the pickles, or with the CSVs and images/.
        split: 'train' (64 classes), 'val' (16) or 'test' (20).
        download: miniImageNet has no official downloader; True raises with instructions when the
            files are missing.
    """

    def __init__(self, root: str, split: str = "train", download: bool = False):
        check_split(split)
        wnids = load_split("miniimagenet", split)
        root = os.path.expanduser(root)
        pkl, csv_path = pickle_path(root, split), os.path.join(root, f"{split}.csv")
        if os.path.isfile(pkl):
            images, labels = _from_pickle(pkl, wnids)
        elif os.path.isfile(csv_path):
            images, labels = _from_csv(root, csv_path, wnids, IMAGE_SIZE)
        else:
            raise missing_error("miniImageNet", root, [pkl, f"{csv_path} (+ {os.path.join(root, 'images')}/)"],
                                _LAYOUT, _HOW + (" (download=True cannot fetch it.)" if download else ""))
        super().__init__(images, labels, wnids, name=f"miniimagenet/{split}")
        self.split = split
