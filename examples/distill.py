"""Knowledge distillation with metafast: train a teacher, then distil it into a smaller student with
``metafast.Distiller`` (the fused ``kd_loss``: temperature-softened KL to the teacher plus the
hard-label cross-entropy), and compare with the same student trained on the labels alone.

    python examples/distill.py --quick        # synthetic data, a few seconds
    python examples/distill.py                # synthetic data, about a minute
    python examples/distill.py --root DIR     # DIR/train/<class>/*.png and DIR/test/<class>/*.png
"""
import argparse
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import metafast


def synthetic(n: int, classes: int, dim: int, seed: int):
    """Gaussian clusters around random centres pushed through a fixed nonlinearity: a teacher MLP
    fits it better than the small student does from labels alone."""
    g = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(classes, dim, generator=g)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5
    g.manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.tanh((centres[y] + 1.5 * torch.randn(n, dim, generator=g)) @ mix)
    return x, y


def folder(root: str, size: int = 16):
    """Flattened images of DIR/train and DIR/test (the same classes in both) via metafast.data.FolderDataset."""
    from metafast.data import FolderDataset

    train, test = FolderDataset(root, "train", image_size=size), FolderDataset(root, "test", image_size=size)
    if train.class_names != test.class_names:
        raise ValueError(f"{root}: train/ and test/ must hold the same class folders for classification")
    flat = lambda s: (s.images.flatten(1).float() / 255, s.labels)  # noqa: E731
    return (*flat(train), *flat(test), train.num_classes)


def mlp(dim: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def train_on_labels(model: nn.Module, x, y, steps: int, batch: int = 128, seed: int = 0) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="DIR with train/ and test/ class folders (default: synthetic data)")
    ap.add_argument("--quick", action="store_true", help="a few seconds")
    ap.add_argument("--steps", type=int, help="optimizer steps of each network (default 3000, --quick 100)")
    args = ap.parse_args(argv)
    steps = args.steps or (100 if args.quick else 3000)
    torch.manual_seed(0)
    if args.root is None:
        classes, dim = 10, 32
        n = 2000 if args.quick else 4000
        (x, y), (xt, yt) = synthetic(n, classes, dim, seed=1), synthetic(2000, classes, dim, seed=2)
    else:
        x, y, xt, yt, classes = folder(args.root)
        dim = x.shape[1]

    t0 = time.perf_counter()
    teacher = train_on_labels(mlp(dim, 128 if args.quick else 256, classes), x, y, steps)
    baseline = train_on_labels(mlp(dim, 16, classes), x, y, steps, seed=1)
    student = mlp(dim, 16, classes)
    torch.manual_seed(0)
    distiller = metafast.Distiller(teacher, student, temperature=4.0, alpha=0.9, lr=1e-3, seed=1)
    distiller.fit(x, y, steps=steps, batch_size=128, progress=False)
    acc = {name: accuracy(m, xt, yt) for name, m in (("teacher", teacher), ("student, labels only", baseline),
                                                        ("student, distilled", student))}
    print("test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
          + f" ({time.perf_counter() - t0:.1f} s)")
    return 0 if acc["student, distilled"] > 1.0 / classes else 1


if __name__ == "__main__":
    sys.exit(main())
