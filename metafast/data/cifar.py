"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): few-shot splits of CIFAR-100,
read from the CIFAR-100 python pickles that torchvision downloads.

``root/cifar-100-python/{train,test,meta}``. Both benchmarks pool the 500 train + 100 test images of
each class (600 per class, 32x32 RGB). CIFAR-FS splits the 100 fine classes 64/16/20; FC100 splits
the 20 superclasses 12/4/4 (60/20/20 fine classes), so no superclass spans two splits.
Files are md5-checked against torchvision's published sums before unpickling (``check_md5=False``
skips that, e.g. for a re-packed copy).
"""
import os
import pickle
from typing import List, Tuple

import torch

from .episodes import ImageSplit
from .splits import DatasetCorruptError, check_md5, check_split, load_split, missing_error, offline_error

FOLDER = "cifar-100-python"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# torchvision.datasets.CIFAR100's sums of the extracted files
FILES_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
             "meta": "7973b15100ade9c7d40fb424638fde48"}
_LAYOUT = f"  <root>/{FOLDER}/train\n  <root>/{FOLDER}/test\n  <root>/{FOLDER}/meta"
_HOW = (f"Download {URL} and extract it into root (it unpacks to {FOLDER}/), or pass download=True on a "
        "machine with network access (uses torchvision's downloader).")


def _unpickle(path: str, md5: bool) -> dict:
    if md5:
        check_md5(path, FILES_MD5[os.path.basename(path)], _HOW)
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError) as e:
        raise DatasetCorruptError(f"CIFAR-100: {path} is not a readable pickle ({type(e).__name__}: {e}); "
                                  f"it is truncated or damaged. {_HOW}") from None
    if not isinstance(obj, dict):
        raise DatasetCorruptError(f"CIFAR-100: {path} should hold a dict, got {type(obj).__name__}")
    return obj


def download(root: str) -> None:
    try:
        from torchvision.datasets.utils import download_and_extract_archive
    except ImportError as e:
        raise ImportError(f"CIFAR-100 download=True needs torchvision ({e}); {_HOW}") from None
    try:
        download_and_extract_archive(URL, os.path.expanduser(root), filename=ARCHIVE, md5=ARCHIVE_MD5)
    except Exception as e:  # noqa: BLE001 - network errors and md5 mismatches alike
        raise offline_error("CIFAR-100", root, e, _HOW) from None


def load_cifar100(root: str, download_missing: bool = False, md5: bool = True):
    """All 60000 CIFAR-100 images: (uint8 [N, 3, 32, 32], fine [N], coarse [N], fine names, coarse names)."""
    root = os.path.expanduser(root)
    base = os.path.join(root, FOLDER)
    paths = [os.path.join(base, n) for n in ("train", "test", "meta")]
    if download_missing and not all(os.path.isfile(p) for p in paths):
        download(root)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise missing_error("CIFAR-100", root, missing, _LAYOUT, _HOW)
    meta = _unpickle(paths[2], md5)
    for key in ("fine_label_names", "coarse_label_names"):
        if key not in meta:
            raise DatasetCorruptError(f"CIFAR-100: {paths[2]} lacks {key!r}")
    images, fine, coarse = [], [], []
    for p in paths[:2]:
        d = _unpickle(p, md5)
        for key in ("data", "fine_labels", "coarse_labels"):
            if key not in d:
                raise DatasetCorruptError(f"CIFAR-100: {p} lacks {key!r}")
        x = torch.as_tensor(d["data"])
        n = len(d["fine_labels"])
        if x.dtype != torch.uint8 or x.dim() != 2 or x.shape != (n, 3 * 32 * 32) or len(d["coarse_labels"]) != n:
            raise DatasetCorruptError(f"CIFAR-100: {p}: expected uint8 data [{n}, 3072] and {n} labels of each kind, "
                                      f"got data {x.dtype} {tuple(x.shape)}, {len(d['coarse_labels'])} coarse labels")
        images.append(x.view(n, 3, 32, 32))
        fine.append(torch.as_tensor(d["fine_labels"], dtype=torch.int64))
        coarse.append(torch.as_tensor(d["coarse_labels"], dtype=torch.int64))
    return (torch.cat(images), torch.cat(fine), torch.cat(coarse), list(meta["fine_label_names"]),
            list(meta["coarse_label_names"]))


def _select(images, fine, fine_names: List[str], wanted: List[str], name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    unknown = [w for w in wanted if w not in fine_names]
    if unknown:
        raise DatasetCorruptError(f"{name}: the CIFAR-100 meta file lacks the classes {unknown[:5]}")
    ids = torch.tensor([fine_names.index(w) for w in wanted])
    remap = torch.full((len(fine_names),), -1, dtype=torch.int64)
    remap[ids] = torch.arange(len(wanted))
    labels = remap[fine]
    keep = labels >= 0
    return images[keep].contiguous(), labels[keep]


class CIFARFS(ImageSplit):
    """CIFAR-FS split as uint8 [N, 3, 32, 32]: 'train' 64, 'val' 16, 'test' 20 fine classes."""

    def __init__(self, root: str, split: str = "train", download: bool = False, check_md5: bool = True):
        check_split(split)
        classes = load_split("cifarfs", split)
        images, fine, _, fine_names, _ = load_cifar100(root, download, check_md5)
        x, y = _select(images, fine, fine_names, classes, "CIFAR-FS")
        super().__init__(x, y, classes, name=f"cifarfs/{split}")
        self.split = split


class FC100(ImageSplit):
    """FC100 split as uint8 [N, 3, 32, 32]: the fine classes of 12 ('train'), 4 ('val') or 4 ('test')
    superclasses; ``class_names`` are fine names, ``superclasses`` the split's superclass names."""

    def __init__(self, root: str, split: str = "train", download: bool = False, check_md5: bool = True):
        check_split(split)
        supers = load_split("fc100", split)
        images, fine, coarse, fine_names, coarse_names = load_cifar100(root, download, check_md5)
        unknown = [s for s in supers if s not in coarse_names]
        if unknown:
            raise DatasetCorruptError(f"FC100: the CIFAR-100 meta file lacks the superclasses {unknown}")
        # the fine classes of each superclass, in fine-label order (read from the data itself)
        sup_ids = torch.tensor([coarse_names.index(s) for s in supers])
        classes = [fine_names[f] for f in torch.unique(fine[torch.isin(coarse, sup_ids)]).tolist()]
        x, y = _select(images, fine, fine_names, classes, "FC100")
        super().__init__(x, y, classes, name=f"fc100/{split}")
        self.split = split
        self.superclasses = supers
