"""Peak memory of one second-order MAML meta-step against the number of inner steps K: metafast's memory
modes against learn2learn and torch.func, in the same run.

Workload (the MAML paper's miniImageNet setting): Conv4 with 32 channels on 84x84x3 images, 5-way 5-shot,
15 queries per class, meta-batch 2, inner lr 0.01, second order.

CPU: every (method, K) runs in a fresh process. The process builds model and batch, notes its resident
memory, runs one warm-up meta-step (forward + backward), resets the peak (``/proc/self/clear_refs``) and
runs the measured step; the row's ``peak_mb`` is that step's peak resident memory minus the resident
memory before the warm-up, i.e. what the meta-step adds (blocks a cache kept from the warm-up count).
GPU: ``torch.cuda.max_memory_allocated`` over the measured step, minus what was allocated before it.

``--model resnet12 --tasks 4 --steps 10 --device cuda --cuda-budget-gb G``: the memory issue's GPU run,
miniImageNet ResNet-12 (wide, 64-160-320-640) 5-way 5-shot, meta-batch 4, second order, every method held
to the same G GB of the GPU (``torch.cuda.set_per_process_memory_fraction``). A baseline that runs out of
memory there gets the row note "out of memory" (the point of the run); metafast running out is a failure.

``--model resnet12 --width narrow --image 32 --shots 1 --queries 3 --tasks 4 --steps 1 5``: the executor
issue's workload (ResNet-12 narrow on CIFAR-FS-shaped episodes, 5-way 1-shot, 3 queries, meta-batch 4);
its target is a low-mode peak no higher than learn2learn's at every K (rows: memory_resnet12_narrow_cpu.json).
The same with ``--tasks 16 --steps 5 --tag tasks16``: what a larger meta-batch adds to each mode's peak.

A method whose memory, extrapolated linearly in K from its two previous rows, would exceed
``--budget-mb`` is skipped at that K (its row says so): at K = 100 torch.func, learn2learn and metafast's
fast mode would need many GB.
Each method's meta-gradient is compared with learn2learn's at the same K where both ran (in float32 the
distance grows with K; torch.func's own distance from learn2learn sets the tolerance's scale).

    python bench/bench_memory.py [--steps 1 5 10 25 100] [--budget-mb 12000] [--device cpu|cuda] [--quick]
                                 [--model conv4|resnet12] [--width wide|narrow] [--tasks 2] [--shots 5]
                                 [--queries 15] [--cuda-budget-gb G]
                                 [--no-plot]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `metafast` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.baselines import Learn2Learn, TorchFunc  # noqa: E402
from bench.common import RESULTS_DIR, RowSink, base_row, finish, print_table  # noqa: E402

BENCH = "memory"
WAYS, LR = 5, 0.01
MODELS = ("conv4", "resnet12")
WIDTHS = ("wide", "narrow")  # ResNet-12: 64-160-320-640 or 64-128-256-512
# (method, BatchedMAML keyword arguments); baselines take none
METHODS = {
    "metafast fast": {"memory": "fast"},
    "metafast low": {"memory": "low"},
    "metafast low chunk=1": {"memory": "low", "task_chunk": 1},
    "metafast min chunk=1": {"memory": "min", "task_chunk": 1},
    "learn2learn": None,
    "torch.func": None,
}
GRAD_RTOL = 1e-3  # the floor; where torch.func ran too, twice its distance from learn2learn (rounding grows with K)
COLUMNS = ["method", "steps", "peak_mb", "s_per_step", "vs_learn2learn", "grad_rel_err_vs_learn2learn",
           "grad_rel_err_vs_float64", "note"]
REFERENCE = "metafast low"  # --float64-reference: this method in float64 (exact to 1e-10 per the test suite)


def _batch(args, device: torch.device):
    g = torch.Generator().manual_seed(0)
    image, tasks = args.image, args.tasks
    sx = torch.randn(tasks, WAYS * args.shots, 3, image, image, generator=g)
    qx = torch.randn(tasks, WAYS * args.queries, 3, image, image, generator=g)
    sy = torch.arange(WAYS).repeat_interleave(args.shots).repeat(tasks, 1)
    qy = torch.arange(WAYS).repeat_interleave(args.queries).repeat(tasks, 1)
    return [t.to(device) for t in (sx, sy, qx, qy)]


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def child(method: str, steps: int, args, device: torch.device, grad_path: str) -> Dict[str, object]:
    """One (method, K) in this process: measure, save the meta-gradient, return the numbers."""
    if device.type == "cuda" and args.cuda_budget_gb:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cuda_budget_gb * 2**30 / total), device)
    try:
        return _measure(method, steps, args, device, grad_path)
    except torch.cuda.OutOfMemoryError:
        if METHODS[method] is not None:
            raise
        return {"peak_mb": None, "s_per_step": None, "note": "out of memory", "describe": ""}


def _measure(method: str, steps: int, args, device: torch.device, grad_path: str) -> Dict[str, object]:
    import metafast
    from metafast.models import Conv4, ResNet12

    image, dtype = args.image, torch.float64 if args.float64 else torch.float32
    torch.manual_seed(0)
    if args.model == "resnet12":
        model = getattr(ResNet12, args.width)(WAYS, in_channels=3, image_size=image).to(device)
    else:
        model = Conv4(WAYS, in_channels=3, hidden=32, image_size=image, stride=1, pool=True).to(device)
    model = model.to(dtype)
    batch = [t.to(dtype) if t.is_floating_point() else t for t in _batch(args, device)]
    if METHODS[method] is not None:
        maml = metafast.BatchedMAML(model, inner_lr=LR, inner_steps=steps, loss="cross_entropy",
                                    **METHODS[method])
        params = list(maml.parameters())

        def step():
            maml(*batch).loss.backward()
    else:
        subject = (Learn2Learn if method == "learn2learn" else TorchFunc)(model, LR, steps, "cross_entropy")
        params = subject.params

        def step():
            subject.forward_backward(*batch)

    def run() -> float:
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if device.type == "cuda":
        run()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for p in params:
            p.grad = None
        seconds = run()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        base = _rss_mb("VmRSS")
        run()
        _reset_peak()
        seconds = run()
        peak = _rss_mb("VmHWM") - base
    torch.save(torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).cpu(), grad_path)
    desc = maml.describe().splitlines()[-1] if METHODS[method] is not None else ""
    return {"peak_mb": round(peak, 1), "s_per_step": round(seconds, 4), "describe": desc}


def _run_child(method: str, steps: int, args, grad_path: str, float64: bool = False) -> Dict[str, object]:
    cmd = [sys.executable, os.path.abspath(__file__)] + ["--float64"] * float64 + ["--child", method, "--steps", str(steps), "--image",
           str(args.image), "--device", args.device, "--grad-out", grad_path, "--threads", str(args.threads),
           "--model", args.model, "--width", args.width, "--tasks", str(args.tasks), "--shots",
           str(args.shots), "--queries", str(args.queries), "--cuda-budget-gb", str(args.cuda_budget_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} at K={steps} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _predicted(rows: List[Dict[str, object]], method: str, steps: int) -> Optional[float]:
    mine = [(r["steps"], r["peak_mb"]) for r in rows if r["method"] == method and r.get("peak_mb") is not None]
    if len(mine) < 2:
        return None
    (k0, m0), (k1, m1) = mine[-2:]
    return m1 + (m1 - m0) / max(k1 - k0, 1) * (steps - k1)


def targets(rows: List[Dict[str, object]]) -> List[str]:
    """The memory issue's targets, each 'PASS ...' or 'FAIL ...' (or 'n/a ...' without the rows)."""
    at = {(r["method"], r["steps"]): r for r in rows if r.get("peak_mb") is not None}
    out = []

    def check(name, ok, detail):
        out.append(f"{'n/a ' if ok is None else 'PASS' if ok else 'FAIL'} {name}: {detail}")

    if rows and rows[0].get("model") == "resnet12":
        if rows[0].get("device_type") == "cuda":  # the GPU run: what fits where learn2learn does not
            fits = [r["steps"] for r in rows if r["method"] == "metafast low" and r.get("peak_mb") is not None]
            oom = [r["steps"] for r in rows if r["method"] == "learn2learn" and r.get("note") == "out of memory"]
            check("metafast low fits where learn2learn runs out of memory",
                  None if not oom else bool(set(fits) & set(oom)),
                  f"low ran at K = {fits}, learn2learn out of memory at K = {oom}")
            return out
        # the executor issue's target: with a low-memory mode, peak <= learn2learn's at every K
        ks = sorted(k for (m, k) in at if m == "learn2learn")
        lows = [m for m in METHODS if m.startswith(("metafast low", "metafast min"))]
        best = {k: min((at[(m, k)]["peak_mb"] for m in lows if (m, k) in at), default=None) for k in ks}
        check("low-mode peak <= learn2learn at every K",
              None if not ks or None in best.values() else all(best[k] <= at[("learn2learn", k)]["peak_mb"] for k in ks),
              "; ".join(f"K={k}: {best[k]} vs {at[('learn2learn', k)]['peak_mb']} MB" for k in ks))
        return out
    low, l2l, fast = at.get(("metafast low", 10)), at.get(("learn2learn", 10)), at.get(("metafast fast", 10))
    check("K=10 low peak <= 0.5x learn2learn", None if not (low and l2l) else low["peak_mb"] <= 0.5 * l2l["peak_mb"],
          f"{low and low['peak_mb']} vs {l2l and l2l['peak_mb']} MB")
    check("K=10 low time <= 1.3x fast", None if not (low and fast) else low["s_per_step"] <= 1.3 * fast["s_per_step"],
          f"{low and low['s_per_step']} vs {fast and fast['s_per_step']} s")
    ks = sorted(k for (m, k) in at if m == "metafast low")
    if ks:
        lo, hi = at[("metafast low", ks[0])], at[("metafast low", ks[-1])]
        check(f"low peak at K={ks[-1]} <= 1.5x K={ks[0]}", hi["peak_mb"] <= 1.5 * lo["peak_mb"],
              f"{hi['peak_mb']} vs {lo['peak_mb']} MB")
    both = [k for (m, k) in at if m == "metafast low chunk=1" and ("learn2learn", k) in at]
    check("chunk=1 peak <= learn2learn at every K",
          None if not both else all(at[("metafast low chunk=1", k)]["peak_mb"] <= at[("learn2learn", k)]["peak_mb"]
                                    for k in both), f"K = {sorted(both)}")
    return out


def plot(rows: List[Dict[str, object]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = [(r["steps"], r["peak_mb"]) for r in rows if r["method"] == method and r.get("peak_mb") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("inner steps K")
    ax.set_ylabel("peak memory one meta-step adds (MB)")
    r0 = rows[0]
    ax.set_title(f"second-order MAML, {r0['model']} miniImageNet 5w5s, meta-batch {r0['tasks']}\n{r0['device']}, "
                 f"{r0['commit']}, {r0['date']}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 25, 100])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   type=lambda name: name.replace("_", " "), help="e.g. metafast_low learn2learn (_ for spaces)")
    p.add_argument("--budget-mb", type=float, default=12000.0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--image", type=int, default=84)
    p.add_argument("--model", default="conv4", choices=MODELS, help="conv4 (32 channels) or resnet12 (wide)")
    p.add_argument("--width", default="wide", choices=WIDTHS, help="resnet12: wide (64-160-320-640) or narrow "
                   "(64-128-256-512)")
    p.add_argument("--tasks", type=int, default=2, help="meta-batch size (default 2)")
    p.add_argument("--shots", type=int, default=5, help="support examples per class (default 5)")
    p.add_argument("--queries", type=int, default=15, help="query examples per class (default 15)")
    p.add_argument("--cuda-budget-gb", type=float, default=0.0,
                   help="cuda: hold every method to this many GB of the GPU (0: the whole GPU)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="32x32 images, K = 1 2 4 (a smoke run)")
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--no-plot", action="store_true", help="no PNG (e.g. a machine without matplotlib)")
    p.add_argument("--tag", default="", help="appended to the results file's name (e.g. tasks16 for a meta-batch sweep)")
    p.add_argument("--float64-reference", action="store_true",
                   help="compare meta-gradients with metafast's low mode in float64 instead of learn2learn's fp32 "
                        "(on by default for resnet12: in fp32 its gradients are ill-conditioned, bench/NOTES.md)")
    p.add_argument("--float64", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--grad-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.steps[0], args, device, args.grad_out)))
        return 0
    if args.quick:
        args.image, args.steps = 32, [1, 2, 4]
    rows: List[Dict[str, object]] = []
    if args.tasks < 1:
        p.error(f"--tasks: expected an integer >= 1, got {args.tasks}")
    suffix = "" if args.model == "conv4" else f"_{args.model}" + ("_narrow" if args.width == "narrow" else "")
    suffix += f"_{args.tag}" if args.tag else ""
    sink = RowSink(f"{BENCH}{suffix}_{args.device}", out_dir=args.out)
    sink.expect(len(args.steps) * len(args.methods))
    floor = GRAD_RTOL
    use_f64 = args.float64_reference or args.model == "resnet12"
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            grads = {}
            if use_f64:
                path = os.path.join(tmp, f"f64_{steps}.pt")
                _run_child(REFERENCE, steps, args, path, float64=True)  # its failure fails the run
                f64 = torch.load(path)
            for method in args.methods:
                row = dict(base_row(BENCH, device), method=method, steps=steps, image=args.image, tasks=args.tasks,
                           model=args.model, width=args.width if args.model == "resnet12" else None,
                           shots=args.shots, queries=args.queries, device_type=args.device, cuda_budget_gb=args.cuda_budget_gb or None, peak_mb=None,
                           s_per_step=None, note="")
                guess = _predicted(rows, method, steps)
                if guess is not None and guess > args.budget_mb:
                    row["note"] = f"skipped: ~{guess:.0f} MB predicted > --budget-mb {args.budget_mb:.0f}"
                else:
                    path = os.path.join(tmp, f"{len(rows)}.pt")
                    try:
                        row.update(_run_child(method, steps, args, path))
                        if row["peak_mb"] is not None:  # else a baseline out of memory: its row says so
                            grads[method] = torch.load(path)
                    except RuntimeError as e:
                        print(e, file=sys.stderr)
                        row["note"] = "failed"
                        if METHODS[method] is not None:
                            sink.fail(f"{method} K={steps} did not run")
                rows.append(row)
                print(f"{method:22s} K={steps:<4d} {row['peak_mb']} MB  {row['s_per_step']} s  {row['note']}",
                      flush=True)
            ref = f64 if use_f64 else grads.get("learn2learn")
            key = "grad_rel_err_vs_float64" if use_f64 else "grad_rel_err_vs_learn2learn"
            if use_f64:  # a fp32 metafast gradient may be as far from the float64 one as twice the baselines' are
                for b in ("learn2learn", "torch.func"):
                    if b in grads:
                        floor = max(floor, 2 * float((grads[b] - ref).norm() / ref.norm()))
            # fp32 through K inner steps on random images amplifies rounding: torch.func's distance from
            # learn2learn (two correct implementations) sets the scale a wrong gradient must exceed
            # (carried to larger K where torch.func no longer fits: the distance only grows with K)
            if not use_f64 and ref is not None and "torch.func" in grads:
                floor = max(floor, 2 * float((grads["torch.func"] - ref).norm() / ref.norm()))
            for row in rows[-len(args.methods):]:
                l2l = next((r for r in rows if r["method"] == "learn2learn" and r["steps"] == steps), None)
                if l2l and l2l["peak_mb"] and row["peak_mb"] is not None:
                    row["vs_learn2learn"] = round(row["peak_mb"] / l2l["peak_mb"], 3)
                if ref is not None and row["method"] in grads:
                    err = float((grads[row["method"]] - ref).norm() / ref.norm())
                    row[key] = err
                    row["grad_tol"] = floor
                    if err > floor and METHODS[row["method"]] is not None:
                        sink.fail(f"{row['method']} K={steps}: meta-gradient off by {err:.2e} ({key})")
                sink.add(row)  # each K's rows once their comparisons are known
    print_table(rows, COLUMNS)
    for line in targets(rows):
        print(line)
    if not (args.quick or args.no_plot):
        png = os.path.join(args.out, f"{BENCH}{suffix}_{args.device}.png")
        plot(rows, png)
        print(f"wrote {png}")
    return finish(sink)


if __name__ == "__main__":
    sys.exit(main())
