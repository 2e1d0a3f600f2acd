"""MAML on CIFAR-100 few-shot tasks with a 3-conv + 2-linear classifier, on metafast.

The version a user arriving from the usual broken recipe should copy. What that recipe got wrong and
what this one does instead:
  - it never called backward: here the query loss of every task goes through ONE
    ``out.loss.backward()`` (the exact second-order meta-gradient) before ``optimizer.step()``;
  - it fed a task sampler to ``DataLoader`` as if it were a dataset: here ``EpisodeSampler`` draws a
    whole meta-batch of N-way K-shot tasks at once ([T, N*K, C, H, W] support, [T, N*Q, ...] query);
  - it loaded a dict of gradients with ``load_state_dict``: here the checkpoint is the model's own
    ``state_dict()`` (and the optimizer's), and loading it gives back the same meta-parameters.

    python examples/cifar100_maml.py --quick             # synthetic CIFAR-like tasks, a few seconds
    python examples/cifar100_maml.py                     # synthetic, about a minute on 2 CPU cores
    python examples/cifar100_maml.py --root DIR          # CIFAR-FS classes of CIFAR-100 under DIR
                                                         # (torchvision's cifar-100-python/ layout)
"""
import argparse
import os
import sys
import time

import torch
from torch import nn

import metafast
from metafast.data import EpisodeSampler, ImageSplit


def classifier(ways: int, width: int = 32, image_size: int = 32, channels: int = 3) -> nn.Module:
    """Three 3x3 conv blocks (conv, per-task BatchNorm, ReLU, 2x2 max-pool) and two linear layers."""
    def block(cin, cout):
        # track_running_stats=False: batch statistics of each task, as MAML uses BatchNorm
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, track_running_stats=False), nn.ReLU(),
                nn.MaxPool2d(2)]

    side = image_size // 8
    return nn.Sequential(*block(channels, width), *block(width, width), *block(width, width), nn.Flatten(),
                         nn.Linear(width * side * side, 2 * width), nn.ReLU(), nn.Linear(2 * width, ways))


def synthetic_split(classes: int, per_class: int, image_size: int, seed: int, name: str) -> ImageSplit:
    """CIFAR-shaped stand-in data: each class a smooth random colour pattern, each image that pattern
    plus noise, as uint8 [N, 3, S, S]. Learnable in a few dozen meta-steps, no download needed."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(classes, 3, 4, 4, generator=g)
    protos = nn.functional.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    noise = 0.15 * torch.randn(classes, per_class, 3, image_size, image_size, generator=g)
    images = (protos.unsqueeze(1) + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return ImageSplit(images.flatten(0, 1), labels, [f"class{c}" for c in range(classes)], name=name)


def load_splits(args, image_size: int = 32):
    if args.root is None:
        return (synthetic_split(64, 20, image_size, seed=1, name="synthetic/train"),
                synthetic_split(20, 20, image_size, seed=2, name="synthetic/test"))
    from metafast.data import CIFARFS  # CIFAR-FS: CIFAR-100 classes split 64/16/20 (Bertinetto et al.)

    return CIFARFS(args.root, split="train"), CIFARFS(args.root, split="test")


def evaluate(maml, sampler, episodes: int, steps: int) -> float:
    accs = []
    for ep in sampler.fixed_episodes(episodes, batch=min(episodes, 25)):
        fast = maml.adapt(ep.support_x, ep.support_y, steps=steps)
        with torch.no_grad():
            logits = maml.predict(fast, ep.query_x)
        accs.append((logits.argmax(-1) == ep.query_y).float().mean(1))
    return torch.cat(accs).mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="folder holding cifar-100-python/ (default: synthetic data)")
    ap.add_argument("--quick", action="store_true", help="a few seconds: tiny network, few iterations")
    ap.add_argument("--iterations", type=int, help="meta-steps (default 300, --quick 15)")
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--meta-batch", type=int, default=8)
    ap.add_argument("--out", default=None, help="where to save the checkpoint (default: none)")
    args = ap.parse_args(argv)
    iterations = args.iterations or (10 if args.quick else 300)
    width = 8 if args.quick else 32
    size = 16 if args.quick and args.root is None else 32  # CIFAR's 32x32; --quick's synthetic images 16x16
    meta_batch = min(args.meta_batch, 4) if args.quick else args.meta_batch
    torch.manual_seed(0)

    train, test = load_splits(args, size)
    model = classifier(args.ways, width=width, image_size=size)
    maml = metafast.BatchedMAML(model, inner_lr=0.1, inner_steps=1, first_order=False, loss="cross_entropy")
    optimizer = torch.optim.Adam(maml.parameters(), lr=3e-3)
    sampler = EpisodeSampler(train, args.ways, args.shots, args.queries, seed=0)
    test_sampler = EpisodeSampler(test, args.ways, args.shots, args.queries)
    episodes = 10 if args.quick else 200

    before = evaluate(maml, test_sampler, episodes, steps=1)
    t0 = time.perf_counter()
    for it in range(1, iterations + 1):
        ep = sampler.sample(meta_batch)
        out = maml(ep.support_x, ep.support_y, ep.query_x, ep.query_y)  # inner loop of every task at once
        optimizer.zero_grad()
        out.loss.backward()  # meta-gradient through the inner loop (second order)
        optimizer.step()
        if it % max(1, iterations // 5) == 0:
            print(f"iteration {it:4d}  query loss {out.loss.item():.3f}  "
                  f"accuracy {out.task_accuracies.mean().item():.3f}")
    seconds = time.perf_counter() - t0
    after = evaluate(maml, test_sampler, episodes, steps=1)
    print(f"{args.ways}-way {args.shots}-shot test accuracy over {episodes} fixed episodes: "
          f"{before:.3f} before, {after:.3f} after {iterations} meta-steps ({seconds:.1f} s)")

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "cifar100_maml.pt")
        torch.save({"model": maml.state_dict(), "optimizer": optimizer.state_dict()}, path)
        restored = metafast.BatchedMAML(classifier(args.ways, width=width, image_size=size), inner_lr=0.1, inner_steps=1,
                                        loss="cross_entropy")
        restored.load_state_dict(torch.load(path, weights_only=True)["model"])  # a state_dict, not gradients
        assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), maml.state_dict().values()))
        print(f"saved {path}")
    return 0 if after > 1.0 / args.ways else 1


if __name__ == "__main__":
    sys.exit(main())
