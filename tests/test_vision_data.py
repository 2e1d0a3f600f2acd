"""Few-shot vision datasets read from tiny fixtures written in each real on-disk format: Omniglot
PNG folders, miniImageNet pickles and CSV + JPEG folders, CIFAR-100 python pickles (CIFAR-FS, FC100).
Also: the published split lists, missing/partial/corrupt files, the offline download path."""
import csv
import hashlib
import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch

from metafast.data import cifar as cifar_mod
from metafast.data.cifar import CIFARFS, FC100
from metafast.data.miniimagenet import MiniImageNet
from metafast.data.omniglot import Omniglot, split_characters
from metafast.data.splits import DatasetCorruptError, DatasetNotFoundError, load_split

# PNG/JPEG encoding and decoding, and the downloaders, come from torchvision (optional)
needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="needs torchvision (image decoding, downloaders)")

# ----------------------------------------------------------------------------- fixture writers
# Each class gets a distinct, learnable pattern: a bright square whose position depends on the class.


def class_pattern(c: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, channels]: noise plus a square at a class-dependent position."""
    img = rng.integers(0, 60, (size, size, channels), dtype=np.uint8)
    cells = 4
    r, q = (c // cells) % cells, c % cells
    s = size // cells
    img[r * s:(r + 1) * s, q * s:(q + 1) * s] = 200 + (c * 7) % 55
    return img


def write_omniglot(root, chars, size=105, drawings=20, seed=0):
    """omniglot-py/<part>/<Alphabet>/<characterNN>/NNNN_NN.png (strokes dark on white, like the originals)."""
    from torchvision.io import encode_png

    rng = np.random.default_rng(seed)
    for i, c in enumerate(chars):
        d = os.path.join(root, "omniglot-py", c)
        os.makedirs(d, exist_ok=True)
        for j in range(drawings):
            img = 255 - class_pattern(i, size, 1, rng)
            png = encode_png(torch.from_numpy(img).permute(2, 0, 1).contiguous())
            with open(os.path.join(d, f"{i:04d}_{j + 1:02d}.png"), "wb") as f:
                f.write(png.numpy().tobytes())


def write_mini_pickle(root, split, per_class=3, size=84, seed=0, name=None):
    rng = np.random.default_rng(seed)
    wnids = load_split("miniimagenet", split)
    images, class_dict = [], {}
    for c, w in enumerate(reversed(wnids)):  # stored order differs from the split order on purpose
        class_dict[w] = list(range(len(images), len(images) + per_class))
        images += [class_pattern(c, size, 3, rng) for _ in range(per_class)]
    path = os.path.join(root, name or f"mini-imagenet-cache-{split}.pkl")
    with open(path, "wb") as f:
        pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, f)
    return path


def write_mini_csv(root, split, per_class=2, size=100, seed=0):
    from torchvision.io import encode_jpeg

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for c, w in enumerate(load_split("miniimagenet", split)):
        for j in range(per_class):
            name = f"{w}{j:08d}.jpg"
            img = torch.from_numpy(class_pattern(c, size, 3, rng)).permute(2, 0, 1).contiguous()
            with open(os.path.join(root, "images", name), "wb") as f:
                f.write(encode_jpeg(img, quality=95).numpy().tobytes())
            rows.append((name, w))
    with open(os.path.join(root, f"{split}.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        writer.writerows(rows)


# CIFAR-100's real label names; the fixture's coarse label of a fine class is read from the splits.
def _cifar_names():
    fine = sorted(load_split("cifarfs", "train") + load_split("cifarfs", "val") + load_split("cifarfs", "test"))
    coarse = sorted(load_split("fc100", "train") + load_split("fc100", "val") + load_split("fc100", "test"))
    return fine, coarse


# fine -> coarse for the 100 classes (CIFAR-100's published hierarchy, 5 fine classes per superclass)
CIFAR_HIERARCHY = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


def write_cifar100(root, train_per_class=2, test_per_class=1, seed=0):
    """cifar-100-python/{train,test,meta} in the real pickle format; returns {file: md5} for patching."""
    rng = np.random.default_rng(seed)
    fine_names, coarse_names = _cifar_names()
    coarse_of = {f: c for c, fs in CIFAR_HIERARCHY.items() for f in fs}
    base = os.path.join(root, "cifar-100-python")
    os.makedirs(base, exist_ok=True)
    sums = {}
    for name, per in (("train", train_per_class), ("test", test_per_class)):
        data, fine, coarse = [], [], []
        for _ in range(per):
            for k, f in enumerate(fine_names):
                data.append(class_pattern(k, 32, 3, rng).transpose(2, 0, 1).reshape(-1))
                fine.append(k)
                coarse.append(coarse_names.index(coarse_of[f]))
        order = rng.permutation(len(data))
        obj = {"data": np.stack(data)[order], "fine_labels": [fine[i] for i in order],
               "coarse_labels": [coarse[i] for i in order], "filenames": [f"{i}.png" for i in order]}
        with open(os.path.join(base, name), "wb") as fh:
            pickle.dump(obj, fh)
    with open(os.path.join(base, "meta"), "wb") as fh:
        pickle.dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, fh)
    for name in ("train", "test", "meta"):
        sums[name] = hashlib.md5(open(os.path.join(base, name), "rb").read()).hexdigest()
    return sums


# ----------------------------------------------------------------------------- split lists
def test_published_split_sizes_and_no_overlap():
    sizes = {"omniglot": (1028, 172, 423), "miniimagenet": (64, 16, 20), "cifarfs": (64, 16, 20), "fc100": (12, 4, 4)}
    for ds, want in sizes.items():
        lists = [load_split(ds, s) for s in ("train", "val", "test")]
        assert tuple(len(x) for x in lists) == want, ds
        for x in lists:
            assert len(set(x)) == len(x), f"{ds}: duplicate class"
        assert not set(lists[0]) & set(lists[1]) and not set(lists[0]) & set(lists[2]) \
            and not set(lists[1]) & set(lists[2]), f"{ds}: class in two splits"
    assert len(split_characters("trainval")) == 1200
    # Vinyals: train/val from the background set plus part of the evaluation set, Gurmukhi split 41/4
    assert sum(c.startswith("images_background/") for c in split_characters("trainval")) == 964
    assert "images_evaluation/Gurmukhi/character41" in split_characters("train")
    assert "images_evaluation/Gurmukhi/character42" in split_characters("test")


def test_fc100_superclasses_partition_the_cifarfs_classes():
    fine, coarse = _cifar_names()
    assert len(fine) == 100 and len(coarse) == 20
    assert sorted(f for fs in CIFAR_HIERARCHY.values() for f in fs) == fine


def test_bad_split_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="split"):
        CIFARFS(str(tmp_path), split="validation")
    with pytest.raises(ValueError, match="split"):
        Omniglot(str(tmp_path), split="eval")


# ----------------------------------------------------------------------------- Omniglot
@needs_torchvision
def test_omniglot_reads_pngs_rotations_and_cache(tmp_path):
    chars = split_characters("val")[:3]
    write_omniglot(str(tmp_path), chars, size=28, drawings=20)
    ds = Omniglot(str(tmp_path), split="val", characters=chars)
    assert ds.images.shape == (3 * 4 * 20, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 12 and ds.class_names[1] == chars[0] + "/rot090"
    assert torch.equal(ds.counts(), torch.full((12,), 20))
    # inverted: the class square is bright on a dark background
    assert ds.images.float().mean() < 128
    # rotation classes are 90-degree rotations of the same drawing
    first = ds.images[ds.labels == 0][0, 0]
    rot = ds.images[ds.labels == 1][0, 0]
    assert torch.equal(rot, torch.rot90(first, 1, (0, 1)))
    assert os.path.isfile(tmp_path / "omniglot-py" / "cache-val-28.pt")
    again = Omniglot(str(tmp_path / "omniglot-py"), split="val", characters=chars, rotations=False)
    assert again.num_classes == 3 and torch.equal(again.images, ds.images[ds.labels % 4 == 0])


@needs_torchvision
def test_omniglot_resize_matches_reference(tmp_path):
    import torch.nn.functional as F

    chars = split_characters("test")[:1]
    write_omniglot(str(tmp_path), chars, size=105, drawings=20)
    ds = Omniglot(str(tmp_path), characters=chars, rotations=False, cache=False)
    from torchvision.io import decode_image, read_file

    d = tmp_path / "omniglot-py" / chars[0]
    raw = decode_image(read_file(str(sorted(d.iterdir())[0])))[0].double()
    ref = F.interpolate((255 - raw)[None, None], size=(28, 28), mode="bilinear", antialias=True)[0, 0]
    assert (ds.images[0, 0].double() - ref).abs().max() <= 0.5 + 1e-9


@needs_torchvision
def test_omniglot_missing_and_partial(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        Omniglot(str(tmp_path), split="test")
    msg = str(e.value)
    assert "images_evaluation/Gurmukhi/character42" in msg and "images_background.zip" in msg and "423 more" not in msg
    chars = split_characters("val")[:2]
    write_omniglot(str(tmp_path), chars, size=28, drawings=20)
    os.remove(next((tmp_path / "omniglot-py" / chars[1]).iterdir()))
    with pytest.raises(DatasetNotFoundError, match="19 of 20 PNGs"):
        Omniglot(str(tmp_path), characters=chars)


@needs_torchvision
def test_omniglot_corrupt_png(tmp_path):
    chars = split_characters("val")[:1]
    write_omniglot(str(tmp_path), chars, size=28, drawings=20)
    bad = sorted((tmp_path / "omniglot-py" / chars[0]).iterdir())[5]
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(DatasetCorruptError, match="cannot decode"):
        Omniglot(str(tmp_path), characters=chars, cache=False)


@needs_torchvision
def test_omniglot_download_offline_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError, match="download into .* failed .*Network is unreachable"):
        Omniglot(str(tmp_path), download=True)


# ----------------------------------------------------------------------------- miniImageNet
@pytest.mark.parametrize("split", ["val", "test"])
def test_miniimagenet_pickle(tmp_path, split):
    write_mini_pickle(str(tmp_path), split, per_class=3, size=84)
    ds = MiniImageNet(str(tmp_path), split=split)
    wnids = load_split("miniimagenet", split)
    assert ds.images.shape == (3 * len(wnids), 3, 84, 84) and ds.class_names == wnids
    # the pickle stores classes in reverse order: class 0 of the split is the pickle's last pattern
    rng = np.random.default_rng(0)
    pats = [class_pattern(c, 84, 3, rng) for c in range(len(wnids)) for _ in range(3)]
    expect = torch.from_numpy(pats[(len(wnids) - 1) * 3]).permute(2, 0, 1)
    assert torch.equal(ds.images[ds.labels == 0][0], expect)


def test_miniimagenet_validation_pickle_name(tmp_path):
    write_mini_pickle(str(tmp_path), "val", per_class=1, name="mini-imagenet-cache-validation.pkl")
    assert MiniImageNet(str(tmp_path), split="val").num_classes == 16


@needs_torchvision
def test_miniimagenet_csv_folder(tmp_path):
    write_mini_csv(str(tmp_path), "val", per_class=2, size=100)
    ds = MiniImageNet(str(tmp_path), split="val")
    assert ds.images.shape == (32, 3, 84, 84) and torch.equal(ds.counts(), torch.full((16,), 2))
    # class c's square is bright (JPEG + resize keep it roughly in place)
    c = 5
    img = ds.images[ds.labels == c][0].float().mean(0)
    s = 84 // 4
    r, q = c // 4, c % 4
    assert img[r * s + 3:(r + 1) * s - 3, q * s + 3:(q + 1) * s - 3].mean() > 150 > img.mean()


@needs_torchvision
def test_miniimagenet_missing_truncated_wrong(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="mini-imagenet-cache-train.pkl"):
        MiniImageNet(str(tmp_path), split="train", download=True)
    path = write_mini_pickle(str(tmp_path), "test", per_class=1, size=84)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(DatasetCorruptError, match="truncated"):
        MiniImageNet(str(tmp_path), split="test")
    # the val pickle under the test name: wrong classes are reported, not loaded
    os.replace(write_mini_pickle(str(tmp_path), "val", per_class=1), path)
    with pytest.raises(DatasetCorruptError, match="Ravi-Larochelle classes"):
        MiniImageNet(str(tmp_path), split="test")
    os.remove(path)
    write_mini_csv(str(tmp_path), "test", per_class=1, size=84)
    os.remove(os.path.join(tmp_path, "images", sorted(os.listdir(os.path.join(tmp_path, "images")))[0]))
    with pytest.raises(DatasetNotFoundError, match="files missing"):
        MiniImageNet(str(tmp_path), split="test")


# ----------------------------------------------------------------------------- CIFAR-FS / FC100
def test_cifarfs_and_fc100(tmp_path, monkeypatch):
    sums = write_cifar100(str(tmp_path), train_per_class=2, test_per_class=1)
    monkeypatch.setattr(cifar_mod, "FILES_MD5", sums)
    fine_names, _ = _cifar_names()
    for split, n in (("train", 64), ("val", 16), ("test", 20)):
        ds = CIFARFS(str(tmp_path), split=split)
        assert ds.num_classes == n and ds.images.shape == (3 * n, 3, 32, 32)
        assert ds.class_names == load_split("cifarfs", split)
        assert torch.equal(ds.counts(), torch.full((n,), 3))
        # images of class c carry the pattern of its CIFAR-100 fine id
        k = fine_names.index(ds.class_names[1])
        img = ds.images[ds.labels == 1][0].float().mean(0)
        r, q = (k // 4) % 4, k % 4
        assert img[r * 8:(r + 1) * 8, q * 8:(q + 1) * 8].min() >= 200
    seen = set()
    for split in ("train", "val", "test"):
        ds = FC100(str(tmp_path), split=split)
        supers = load_split("fc100", split)
        assert ds.num_classes == 5 * len(supers)
        assert sorted(ds.class_names) == sorted(f for s in supers for f in CIFAR_HIERARCHY[s])
        assert not seen & set(ds.class_names)
        seen |= set(ds.class_names)
    assert len(seen) == 100


@needs_torchvision
def test_cifar_md5_missing_truncated_offline(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python/train"):
        CIFARFS(str(tmp_path))
    write_cifar100(str(tmp_path))
    # the fixture is not the published file: the real md5 check rejects it before unpickling
    with pytest.raises(DatasetCorruptError, match="md5"):
        CIFARFS(str(tmp_path))
    train = tmp_path / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes()[:1000])
    with pytest.raises(DatasetCorruptError, match="truncated"):
        FC100(str(tmp_path), check_md5=False)
    os.remove(tmp_path / "cifar-100-python" / "meta")
    import torchvision.datasets.utils as tvu

    def offline(*a, **k):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError, match="download into .* failed"):
        CIFARFS(str(tmp_path), download=True)
