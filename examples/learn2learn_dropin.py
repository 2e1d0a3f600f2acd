"""A learn2learn MAML training loop with one import changed: metafast.MAML in place of
learn2learn.algorithms.MAML (same clone()/adapt() API, fused inner update underneath).

    python examples/learn2learn_dropin.py --quick          # sinusoid regression, a few seconds
    python examples/learn2learn_dropin.py                  # sinusoid regression, about a minute
    python examples/learn2learn_dropin.py --root DIR       # 5-way 1-shot on your ImageFolder DIR

The loop below is learn2learn's own sinusoid / few-shot example loop, unchanged: per task, clone the
learner, adapt on the support set, add the query loss's gradient; then one optimizer step.
"""
import argparse
import math
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

# from learn2learn.algorithms import MAML     <- the learn2learn original
from metafast import MAML  # <- the one changed line


def sinusoid_task(g: torch.Generator, shots: int):
    """The MAML paper's sinusoid: amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5]; support and query of ``shots``."""
    amp = 0.1 + 4.9 * torch.rand(1, generator=g)
    phase = math.pi * torch.rand(1, generator=g)
    x = 10 * torch.rand(2 * shots, 1, generator=g) - 5
    y = amp * torch.sin(x - phase)
    return x[:shots], y[:shots], x[shots:], y[shots:]


def folder_tasks(root: str, ways: int, shots: int, queries: int):
    """(model, task sampler, loss) for few-shot classification on an ImageFolder (metafast.data.folder)."""
    from metafast.data import EpisodeSampler, FolderDataset
    from metafast.models import Conv4

    data = FolderDataset(root, "train", image_size=28, channels=3, min_classes=ways, min_images=shots + queries)
    sampler = EpisodeSampler(data, ways, shots, queries, seed=0)

    def task(g):
        ep = sampler.sample(1)
        return ep.support_x[0], ep.support_y[0], ep.query_x[0], ep.query_y[0]

    model = Conv4(ways, in_channels=3, hidden=16, image_size=28, stride=1, pool=True)
    return model, task, F.cross_entropy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="an ImageFolder (metafast.data.folder layout) for few-shot classification")
    ap.add_argument("--quick", action="store_true", help="a few seconds")
    ap.add_argument("--iterations", type=int, help="meta-steps (default 1000, --quick 40)")
    ap.add_argument("--meta-batch", type=int, help="tasks per meta-step (default 16, --quick 4)")
    ap.add_argument("--adapt-steps", type=int, default=1)
    ap.add_argument("--fast-lr", type=float, default=0.01)
    args = ap.parse_args(argv)
    iterations = args.iterations or (40 if args.quick else 1000)
    meta_batch = args.meta_batch or (4 if args.quick else 16)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    if args.root is None:
        model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
        task, loss_fn = (lambda g: sinusoid_task(g, 10)), F.mse_loss
    else:
        model, task, loss_fn = folder_tasks(args.root, ways=5, shots=1, queries=5)

    maml = MAML(model, lr=args.fast_lr, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), lr=3e-3 if args.quick else 1e-3)
    held_out = [task(torch.Generator().manual_seed(10_000 + i)) for i in range(20)]

    def evaluate() -> float:
        """Query loss after adaptation, averaged over 20 fixed held-out tasks."""
        total = 0.0
        for sx, sy, qx, qy in held_out:
            learner = maml.clone()
            for _ in range(args.adapt_steps):
                learner.adapt(loss_fn(learner(sx), sy))
            total += loss_fn(learner(qx), qy).item()
        return total / len(held_out)

    before = evaluate()
    t0 = time.perf_counter()
    for iteration in range(iterations):
        opt.zero_grad()
        meta_loss = 0.0
        for _ in range(meta_batch):
            learner = maml.clone()
            sx, sy, qx, qy = task(g)
            for _ in range(args.adapt_steps):
                learner.adapt(loss_fn(learner(sx), sy))
            loss = loss_fn(learner(qx), qy)
            loss.backward()
            meta_loss += loss.item()
        for p in maml.parameters():
            p.grad.mul_(1.0 / meta_batch)
        opt.step()
        meta_loss /= meta_batch
        if (iteration + 1) % max(1, iterations // 5) == 0:
            print(f"iteration {iteration + 1:5d}  meta loss {meta_loss:.4f}")
    seconds = time.perf_counter() - t0
    after = evaluate()
    print(f"held-out query loss after adaptation: {before:.4f} before, {after:.4f} after {iterations} iterations "
          f"({seconds:.1f} s)")
    return 0 if math.isfinite(after) else 1


if __name__ == "__main__":
    sys.exit(main())
