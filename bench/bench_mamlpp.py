"""MAML++ options against plain BatchedMAML: the meta-step time of each option alone and of the preset.

Setting: Conv4 Omniglot-shaped (64 channels, stride 2, 28x28x1), 5-way 1-shot, 5 queries per class, T
tasks, K=5 inner steps, second order; a step is forward + backward of the mean query loss. Each
configuration runs on the path BatchedMAML picks (the exact reverse for Conv4; ``--path autograd``
forces the unrolled path for all). Options: lslr (learned per-step per-tensor rates), msl (multi-step
loss: a query pass per step, weights not yet annealed), fo_anneal (derivative-order annealing past its
switch: second order, so its cost is the schedule's bookkeeping), per_step_bn (per-step BatchNorm weights),
per_step_bn_stats (per-step BatchNorm running statistics, updated by each training step), mamlpp (the
preset's lslr + msl + per_step_bn + per_step_bn_stats, second order).
Target: each option <= 1.25x plain, except msl (its extra query passes).

CPU timing: interleaved rounds (bench.common.time_interleaved); ratios are taken within the run.

    python bench/bench_mamlpp.py [--tasks 8] [--steps 5] [--rounds 3] [--path auto|autograd] [--device cpu]
                                 [--options plain,per_step_bn,...] [--quick] [--out DIR]
"""
import argparse
import os
import sys

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `metafast` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import base_row, print_table, time_interleaved, write_rows  # noqa: E402
from metafast import BatchedMAML  # noqa: E402
from metafast.models import Conv4  # noqa: E402

BENCH = "mamlpp"
COLUMNS = ["option", "path", "ms", "vs_plain", "target", "tasks", "steps"]
OPTIONS = {
    "plain": {},
    "lslr": dict(lslr=True),
    "msl": dict(multi_step_loss=True, msl_anneal_iters=100),
    "fo_anneal": dict(first_order_iters=10),
    "per_step_bn": dict(per_step_bn=True),
    "per_step_bn_stats": dict(per_step_bn_stats=True),
    "mamlpp": dict(lslr=True, multi_step_loss=True, msl_anneal_iters=100, per_step_bn=True, per_step_bn_stats=True),
}


def run(tasks: int, steps: int, rounds: int, path: str, device: torch.device, width: int, repeats: int,
        options=tuple(OPTIONS)):
    g = torch.Generator().manual_seed(0)
    ways, shots, queries = 5, 1, 5
    sx = torch.randn(tasks, ways * shots, 1, 28, 28, generator=g).to(device)
    qx = torch.randn(tasks, ways * queries, 1, 28, 28, generator=g).to(device)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous().to(device)
    qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous().to(device)
    fns, mamls = {}, {}
    for name, kw in ((n, OPTIONS[n]) for n in options):
        torch.manual_seed(0)
        model = Conv4(ways, in_channels=1, hidden=width, image_size=28, stride=2, pool=False).to(device)
        maml = BatchedMAML(model, inner_lr=0.1, inner_steps=steps, loss="cross_entropy",
                           exact_reverse=path != "autograd", **kw)
        if "first_order_iters" in kw:
            maml.set_iteration(kw["first_order_iters"])  # past the switch: second order
        mamls[name] = maml

        def step(maml=maml):
            maml.zero_grad(set_to_none=True)
            maml(sx, sy, qx, qy).loss.backward()

        fns[name] = step
    times = time_interleaved(fns, device, rounds, warmup=2, repeats=repeats)
    rows = []
    for name, ms in times.items():
        chosen = next(iter(mamls[name]._signatures.values()))[0].name
        ratio = ms / times["plain"]
        target = None if name in ("plain", "msl", "mamlpp") else ratio <= 1.25
        rows.append(dict(base_row(BENCH, device), option=name, path=chosen, ms=ms, vs_plain=ratio, target=target,
                         tasks=tasks, steps=steps))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--path", choices=("auto", "autograd"), default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--options", default=",".join(OPTIONS),
                   help="comma-separated subset of " + ", ".join(OPTIONS) + " (plain is always timed)")
    p.add_argument("--quick", action="store_true", help="2 tasks, width 16, 2 repeats (a smoke run)")
    p.add_argument("--out", help="write the rows to DIR/mamlpp.json")
    a = p.parse_args(argv)
    tasks, width, repeats = (2, 16, 2) if a.quick else (a.tasks, 64, 5)
    options = ["plain"] + [o for o in a.options.split(",") if o != "plain"]
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        p.error(f"--options: unknown {unknown}; expected names from {list(OPTIONS)}")
    rows = run(tasks, a.steps, a.rounds, a.path, torch.device(a.device), width, repeats, options)
    print_table(rows, COLUMNS)
    if a.out:
        print("wrote", write_rows(BENCH, rows, a.out))
    return 0 if all(r["target"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
