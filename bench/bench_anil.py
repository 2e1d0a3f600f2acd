"""ANIL (anil=True) meta-step: the exact reverse of the head (body by autograd from its features' gradients)
against autograd through the unrolled inner loop, same run, interleaved rounds (CPU medians).

Workloads: Conv4 miniImageNet-shaped (32 ch, 84x84, 5-way 1-shot, 5 queries per class) and ResNet-12
narrow on CIFAR-FS-shaped episodes (32x32, 5-way 1-shot, 3 queries per class); meta-batch 4, second
order, 1 and 5 inner steps. The meta-gradients of every method are compared with the autograd path's
(float32). Rows go to bench/results/anil_<device>.json.

``--memory``: instead, the peak resident memory one meta-step adds, each method in a fresh process (as in
bench_memory.py: after a warm-up step, VmHWM reset, the measured step's peak minus the memory before the
warm-up), with memory="low" and task_chunk=1 as one more method. Rows go to anil_memory_<device>.json.

    PYTHONPATH=. python bench/bench_anil.py [--quick] [--threads 2] [--rounds 3] [--memory]
"""
import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `metafast` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metafast import BatchedMAML
from metafast.models import Conv4, ResNet12

from bench.bench_maml_step import episodes
from bench.common import base_row, print_table, rel_err, time_interleaved, write_rows

WORKLOADS = {
    # name: (model, inner_lr, image shape, queries per class)
    "conv4_miniimagenet": (lambda: Conv4.miniimagenet(5), 0.01, (3, 84, 84), 5),
    "resnet12_narrow_cifar": (lambda: ResNet12.cifar(5, wide=False), 0.01, (3, 32, 32), 3),
}
METHODS = {"exact_reverse": dict(), "exact_reverse_low": dict(memory="low"), "autograd": dict(exact_reverse=False)}
MEMORY_METHODS = {**METHODS, "exact_reverse_low_chunk1": dict(memory="low", task_chunk=1)}
COLUMNS = ["workload", "steps", "method", "ms", "speedup_vs_autograd", "grad_rel_err_vs_autograd", "threads"]
MEMORY_COLUMNS = ["workload", "steps", "method", "peak_mb", "vs_autograd", "threads"]


def _batch(T: int, shape, queries: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return episodes(T, g, 5, 1, queries, lambda rows: torch.rand(T, rows, *shape, generator=g))


def bench(name: str, steps: int, T: int, rounds: int, repeats: int) -> List[Dict[str, object]]:
    make, lr, shape, queries = WORKLOADS[name]
    batch = _batch(T, shape, queries)
    torch.manual_seed(0)
    model = make()
    mamls = {m: BatchedMAML(model, inner_lr=lr, inner_steps=steps, anil=True, loss="cross_entropy", fused=False, **kw)
             for m, kw in METHODS.items()}
    params = list(model.parameters())

    def step(maml):
        return torch.autograd.grad(maml(*batch).loss, params)

    grads = {m: torch.cat([g.reshape(-1) for g in step(maml)]) for m, maml in mamls.items()}
    for m, maml in mamls.items():  # each runs the path it is named after
        taken = next(iter(maml._signatures.values()))[0].name
        if taken != m.replace("_low", ""):
            raise RuntimeError(f"{m}: ran the {taken} path")
    ms = time_interleaved({m: (lambda maml=maml: step(maml)) for m, maml in mamls.items()}, torch.device("cpu"),
                          rounds=rounds, warmup=1, repeats=repeats)
    rows = []
    for m in METHODS:
        rows.append({**base_row("anil", torch.device("cpu")), "workload": name, "steps": steps, "tasks": T,
                     "method": m, "ms": ms[m], "speedup_vs_autograd": ms["autograd"] / ms[m],
                     "grad_rel_err_vs_autograd": rel_err(grads[m], grads["autograd"]),
                     "threads": torch.get_num_threads()})
    return rows


def child(name: str, method: str, steps: int, T: int) -> Dict[str, object]:
    """One method's peak resident memory over one meta-step, in this (fresh) process."""
    from bench.bench_memory import _reset_peak, _rss_mb

    make, lr, shape, queries = WORKLOADS[name]
    batch = _batch(T, shape, queries)
    torch.manual_seed(0)
    model = make()
    maml = BatchedMAML(model, inner_lr=lr, inner_steps=steps, anil=True, loss="cross_entropy", fused=False,
                       **MEMORY_METHODS[method])

    def step():
        for p in model.parameters():
            p.grad = None
        maml(*batch).loss.backward()

    base = _rss_mb("VmRSS")
    step()
    _reset_peak()
    step()
    return {"peak_mb": round(_rss_mb("VmHWM") - base, 1)}


def memory_rows(name: str, steps: int, T: int, threads: int) -> List[Dict[str, object]]:
    rows = []
    for method in MEMORY_METHODS:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--workload", name, "--steps", str(steps),
               "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} {method} K={steps} failed:\n{proc.stderr[-3000:]}")
        peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]
        rows.append({**base_row("anil_memory", torch.device("cpu")), "workload": name, "steps": steps, "tasks": T,
                     "method": method, "peak_mb": peak, "threads": threads})
    auto = next(r["peak_mb"] for r in rows if r["method"] == "autograd")
    for r in rows:
        r["vs_autograd"] = r["peak_mb"] / auto
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one step count, fewer repeats: a smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workload", default="all", choices=["all", *WORKLOADS])
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the minimum counts)")
    ap.add_argument("--memory", action="store_true", help="peak memory per method (fresh processes), not time")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(child(a.workload, a.child, a.steps, 4)))
        return 0
    names = list(WORKLOADS) if a.workload == "all" else [a.workload]
    if a.memory:
        rows = [r for name in names for steps in (1, 5) for r in memory_rows(name, steps, 4, a.threads)]
        print_table(rows, MEMORY_COLUMNS)
        write_rows("anil_memory_cpu", rows, *([a.out] if a.out else []))
        return 0
    rows = []
    for name in names:
        for steps in (1,) if a.quick else (1, 5):
            rows += bench(name, steps, 4, rounds=1 if a.quick else a.rounds, repeats=2 if a.quick else 3)
            print_table(rows[-len(METHODS):], COLUMNS)
            sys.stdout.flush()
    print_table(rows, COLUMNS)
    bad = [r for r in rows if not r["grad_rel_err_vs_autograd"] <= 1e-3]
    if not a.quick:
        write_rows("anil_cpu", rows, *([a.out] if a.out else []))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
