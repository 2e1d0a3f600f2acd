"""metafast.data.folder: a user's ImageFolder as few-shot splits (both layouts, the seeded class split,
decoding to the requested size/channels, the cache and its invalidation, errors naming the path),
and `metafast train/eval --dataset folder --root DIR` end to end on tiny generated PNGs."""
import json
import os
import warnings

import pytest
import torch

from metafast.data import EpisodeSampler, FolderDataset
from metafast.data.folder import FolderCacheWarning, channel_stats, split_classes
from metafast.data.splits import DatasetCorruptError, DatasetNotFoundError

Image = pytest.importorskip("PIL.Image")


def _color(c: int, i: int):
    return ((37 * c + 5 * i) % 256, (91 * c + 3) % 256, (13 * i + 200) % 256)


def make_folder(root, classes=10, per_class=4, size=(12, 9), ext="png", prefix=""):
    """root/<prefix>/class_XX/img_YY.<ext>, each image one solid colour depending on (class, image)."""
    for c in range(classes):
        d = os.path.join(root, prefix, f"class_{c:02d}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size, _color(c, i)).save(os.path.join(d, f"img_{i:02d}.{ext}"))
    return str(root)


def test_seeded_split_is_a_partition_and_depends_only_on_the_seed():
    names = [f"c{i}" for i in range(25)]
    parts = {s: split_classes(names, s, seed=3) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [16, 4, 5]  # 64/16/20 %
    assert sorted(sum(parts.values(), [])) == sorted(names)
    assert parts["train"] == split_classes(list(reversed(names)), "train", seed=3)  # order of listing irrelevant
    assert parts["train"] != split_classes(names, "train", seed=4)
    assert [len(split_classes(names[:3], s)) for s in ("train", "val", "test")] == [1, 1, 1]


def test_flat_layout_decodes_images_to_size_and_channels(tmp_path):
    root = make_folder(tmp_path, classes=10, per_class=3)
    train = FolderDataset(root, "train", image_size=16, channels=3, cache=False)
    val = FolderDataset(root, "val", image_size=16, channels=3, cache=False)
    test = FolderDataset(root, "test", image_size=16, channels=3, cache=False)
    assert train.layout == "seeded"
    assert (train.num_classes, val.num_classes, test.num_classes) == (6, 2, 2)
    assert set(train.class_names) | set(val.class_names) | set(test.class_names) == {f"class_{c:02d}" for c in range(10)}
    assert train.images.shape == (18, 3, 16, 16) and train.images.dtype == torch.uint8
    # a solid colour stays that colour through the resize; labels follow the class folders
    for n in (0, 7, 17):
        c, i = int(train.class_names[int(train.labels[n])].split("_")[1]), n % 3
        expect = torch.tensor(_color(c, i), dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16)
        assert torch.equal(train.images[n], expect)
    gray = FolderDataset(root, "train", image_size=20, channels=1, cache=False)
    assert gray.images.shape == (18, 1, 20, 20)
    r, g, b = _color(int(gray.class_names[0].split("_")[1]), 0)
    assert abs(int(gray.images[0, 0, 0, 0]) - (r * 299 + g * 587 + b * 114) / 1000) <= 1  # Pillow's L


def test_split_folders_layout(tmp_path):
    for split, n in (("train", 5), ("val", 3), ("test", 3)):
        make_folder(tmp_path, classes=n, per_class=2, prefix=split, ext="jpg")
    ds = FolderDataset(str(tmp_path), "val", image_size=16)
    assert ds.layout == "folders" and ds.num_classes == 3 and len(ds) == 6
    assert ds.class_names == ["class_00", "class_01", "class_02"]


def test_cache_is_written_reused_and_invalidated(tmp_path, monkeypatch):
    root = make_folder(tmp_path, classes=5, per_class=2)
    first = FolderDataset(root, "train", image_size=16)
    assert os.path.isfile(first.cache_path)
    import metafast.data.folder as folder

    calls = []
    real = folder._decode
    monkeypatch.setattr(folder, "_decode", lambda *a: calls.append(a) or real(*a))
    again = FolderDataset(root, "train", image_size=16)
    assert calls == [] and torch.equal(again.images, first.images)  # from the cache
    cls = os.path.join(root, first.class_names[0])
    Image.new("RGB", (5, 5), (1, 2, 3)).save(os.path.join(cls, "img_99.png"))  # a new image invalidates it
    third = FolderDataset(root, "train", image_size=16)
    assert len(calls) == len(third) == len(first) + 1


def test_unwritable_cache_warns_and_still_loads(tmp_path, monkeypatch):
    root = make_folder(tmp_path, classes=5, per_class=2)
    import metafast.runtime.checkpoint as ckpt

    def fail(path, write):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(ckpt, "atomic_write", fail)
    with pytest.warns(FolderCacheWarning, match="cannot write the cache"):
        ds = FolderDataset(root, "train", image_size=16)
    assert len(ds) == 6


def test_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match=f"{empty}.*is empty"):
        FolderDataset(str(empty))
    with pytest.raises(DatasetNotFoundError, match="not a directory"):
        FolderDataset(str(tmp_path / "missing"))

    root = make_folder(tmp_path / "few", classes=10, per_class=3)
    with pytest.raises(ValueError, match=f"{root}.*2 classes, fewer than the 5 a task needs"):
        FolderDataset(root, "val", image_size=16, min_classes=5, cache=False)
    with pytest.raises(ValueError, match=r"class folder '.*class_\d\d' has 3 images, fewer than the 4"):
        FolderDataset(root, "train", image_size=16, min_images=4, cache=False)

    bad = make_folder(tmp_path / "bad", classes=3, per_class=2)
    target = os.path.join(bad, "class_01", "img_00.png")
    with open(target, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(DatasetCorruptError, match=f"cannot read image {target}"):
        for split in ("train", "val", "test"):
            FolderDataset(bad, split, image_size=16, cache=False)

    hollow = make_folder(tmp_path / "hollow", classes=3, per_class=1)
    for f in os.listdir(os.path.join(hollow, "class_02")):
        os.remove(os.path.join(hollow, "class_02", f))
    (tmp_path / "hollow" / "class_02" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetNotFoundError, match=r"class_02' holds no images"):
        for split in ("train", "val", "test"):
            FolderDataset(hollow, split, image_size=16, cache=False)

    split_root = tmp_path / "splits"
    make_folder(split_root, classes=3, per_class=2, prefix="train")
    with pytest.raises(DatasetNotFoundError, match=f"no test/; add {split_root / 'test'}"):
        FolderDataset(str(split_root), "test")


def test_sampler_on_a_folder_split_and_channel_stats(tmp_path):
    root = make_folder(tmp_path, classes=10, per_class=4)
    ds = FolderDataset(root, "train", image_size=16, cache=False)
    mean, std = channel_stats(ds)
    x = ds.images.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), x.mean(dim=(0, 2, 3)), atol=1e-12, rtol=0)
    ep = EpisodeSampler(ds, ways=5, shots=1, queries=3, mean=mean, std=std).sample(2)
    assert ep.support_x.shape == (2, 5, 3, 16, 16) and ep.query_x.shape == (2, 15, 3, 16, 16)


def test_train_and_eval_cli_on_a_folder(tmp_path):
    from metafast import cli

    root = make_folder(tmp_path / "data", classes=12, per_class=3, size=(20, 20))
    out = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--root", root, "--image-size", "16", "--channels", "3",
            "--normalize", "dataset", "--ways", "2", "--shots", "1", "--queries", "1", "--eval-queries", "2",
            "--iterations", "3", "--meta-batch", "2", "--width", "4", "--val-every", "2", "--val-episodes", "2",
            "--eval-episodes", "4", "--device", "cpu", "--out", str(out), "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matplotlib/backend notices are not under test
        assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "folder" and metrics["episodes"] == 4 and 0 <= metrics["accuracy"] <= 1
    assert len(metrics["config"]["mean"]) == 3 and metrics["config"]["image_size"] == 16

    assert cli.main(["eval", str(out), "--split", "val", "--episodes", "3", "--device", "cpu",
                     "--out", str(tmp_path / "val.json")]) == 0
    assert json.loads((tmp_path / "val.json").read_text())["split"] == "val"


def test_cli_error_names_the_folder(tmp_path, capsys):
    from metafast import cli

    root = make_folder(tmp_path / "data", classes=6, per_class=2)
    code = cli.main(["train", "--dataset", "folder", "--root", root, "--ways", "5", "--iterations", "1",
                     "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert root in err and "fewer than the 5 a task needs" in err
