"""Multi-task learning with metafast: one shared trunk, one linear head per task (the heads run as one
batched matmul + fused cross-entropy), the task losses weighted by learned uncertainty
(Kendall et al. 2018) or GradNorm or equally.

    python examples/multitask.py --quick                   # synthetic tasks, a few seconds
    python examples/multitask.py --weighting gradnorm      # synthetic tasks, about a minute
    python examples/multitask.py --root DIR                # DIR/train/<class>/..., DIR/test/<class>/...:
                                                           # task 0 the class, task 1 its parity
"""
import argparse
import sys
import time

import torch
from torch import nn

import metafast
from metafast.multitask import MultiTaskTrainer, make_weighting, per_task_accuracy


def synthetic(n: int, dim: int, tasks: int, seed: int):
    """Shared inputs [n, dim]; task t labels each row by which of 4 random directions it points to most
    (the tasks share the input statistics, not the labels)."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(tasks, 4, dim, generator=g)
    g.manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.stack([(x @ directions[t].T).argmax(-1) for t in range(tasks)])  # [tasks, n]
    return x, y, [4] * tasks


def folder(root: str, size: int = 16):
    from metafast.data import FolderDataset

    train, test = FolderDataset(root, "train", image_size=size), FolderDataset(root, "test", image_size=size)
    if train.class_names != test.class_names:
        raise ValueError(f"{root}: train/ and test/ must hold the same class folders")

    def xy(s):
        return s.images.flatten(1).float() / 255, torch.stack([s.labels, s.labels % 2])

    return (*xy(train), *xy(test), [train.num_classes, 2])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="DIR with train/ and test/ class folders (default: synthetic tasks)")
    ap.add_argument("--quick", action="store_true", help="a few seconds")
    ap.add_argument("--steps", type=int, help="optimizer steps (default 2000, --quick 100)")
    ap.add_argument("--weighting", choices=("uncertainty", "gradnorm", "equal"), default="uncertainty")
    args = ap.parse_args(argv)
    steps = args.steps or (100 if args.quick else 2000)
    torch.manual_seed(0)
    if args.root is None:
        x, y, outs = synthetic(4000, 24, tasks=3, seed=1)
        xt, yt, _ = synthetic(2000, 24, tasks=3, seed=2)
    else:
        x, y, xt, yt, outs = folder(args.root)
    if len(set(outs)) != 1:  # heads of one shape stack into one batched matmul; pad the smaller ones
        outs = [max(outs)] * len(outs)

    trunk = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    model = metafast.MultiTask(trunk, [nn.Linear(64, o) for o in outs])
    weighting = make_weighting(args.weighting, model.num_tasks)
    opt = torch.optim.Adam(MultiTaskTrainer.parameter_groups(model, weighting, lr=1e-3, weighting_lr=1e-2))
    trainer = MultiTaskTrainer(model, weighting, opt)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        out = trainer.step(x[idx], y[:, idx])
        if step % max(1, steps // 5) == 0:
            losses = ", ".join(f"{v:.3f}" for v in out["losses"].tolist())
            weights = ", ".join(f"{v:.2f}" for v in out["weights"].tolist())
            print(f"step {step:5d}  task losses [{losses}]  weights [{weights}]")
    acc = per_task_accuracy(model, xt, yt)
    print("test accuracy per task: " + ", ".join(f"{a:.3f}" for a in acc)
          + f" ({model.num_tasks} heads {'stacked' if model.stacked else 'looped'}, "
            f"{time.perf_counter() - t0:.1f} s)")
    return 0 if all(a > 1.0 / o for a, o in zip(acc, outs)) else 1


if __name__ == "__main__":
    sys.exit(main())
