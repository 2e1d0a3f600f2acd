"""examples/ in their short modes (--quick on synthetic data, and on a tiny generated ImageFolder
through --root): each runs to the end and returns 0, which each script makes depend on its result
(accuracy above chance, a finite loss)."""
import importlib.util
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["cifar100_maml", "learn2learn_dropin", "distill", "multitask"])
def test_example_quick(name, capsys, tmp_path):
    argv = ["--quick"] + (["--out", str(tmp_path)] if name == "cifar100_maml" else [])
    assert _load(name).main(argv) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out or "loss" in out
    if name == "cifar100_maml":
        assert os.path.isfile(tmp_path / "cifar100_maml.pt")  # saved, reloaded and compared inside


def _image_folder(root, splits, classes=6, per_class=3):
    Image = pytest.importorskip("PIL.Image")
    for split in splits:
        for c in range(classes):
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d)
            for i in range(per_class):
                Image.new("RGB", (10, 10), (40 * c, 20 * i, 200)).save(os.path.join(d, f"{i}.png"))
    return str(root)


def test_examples_on_a_folder(tmp_path):
    flat = _image_folder(tmp_path / "flat", [""], classes=12, per_class=6)
    assert _load("learn2learn_dropin").main(["--root", flat, "--iterations", "2", "--meta-batch", "2"]) == 0
    split = _image_folder(tmp_path / "split", ["train", "test"], classes=4)
    assert _load("multitask").main(["--root", split, "--steps", "3"]) in (0, 1)  # 3 steps: runs, not yet learned
    assert _load("distill").main(["--root", split, "--steps", "3"]) in (0, 1)
